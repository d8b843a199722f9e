"""`taxoclip export open_clip`: a LiT model as an open_clip folder that open_clip itself (and
pybioclip) opens with no taxoclip code, giving taxoclip's probabilities."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taxoclip import TaxoclipError
from taxoclip.apps.cli import main

# Opens an exported folder with open_clip alone (a fresh interpreter that never imports taxoclip)
# and prints the class probabilities of the given photos, or of the uint8 pixels in a .npy file.
OPEN_CLIP_ALONE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, open_clip, torch
    from PIL import Image
    folder, inputs = sys.argv[1], sys.argv[2:]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    classes = torch.from_numpy(np.load(f"{folder}/class_embeddings.npy"))
    meta = json.load(open(f"{folder}/open_clip_config.json"))
    captions = json.load(open(f"{folder}/captions.json"))
    style = meta["taxoclip"]["eval_style"]
    with torch.no_grad():
        texts = [c[style] for c in captions["by_class"]]
        encoded = model.encode_text(tokenizer(texts), normalize=True)
        if inputs[0].endswith(".npy"):
            cfg = meta["preprocess_cfg"]
            pixels = torch.from_numpy(np.load(inputs[0])).float() / 255
            mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
            images = (pixels - mean) / std
        else:
            images = torch.stack([preprocess(Image.open(p)) for p in inputs])
        image = model.encode_image(images, normalize=True)
        probabilities = (model.logit_scale.exp() * image @ classes.T).softmax(-1)
    assert "taxoclip" not in sys.modules
    print(json.dumps({"probabilities": probabilities.tolist(), "text": encoded.tolist()}))
    """
)


def open_clip_alone(folder, *inputs) -> dict:
    """Run OPEN_CLIP_ALONE in a fresh interpreter whose path cannot reach taxoclip's source."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", OPEN_CLIP_ALONE, str(folder), *map(str, inputs)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_lit(colour_features, tiny_text_tower, tmp_path_factory):
    """A LiT model on random-weight towers of real architectures (timm EfficientNet, a BERT)."""
    from conftest import tiny_train_config
    from taxoclip.train.lit import train_lit

    out = tmp_path_factory.mktemp("tiny_lit")
    train_lit(tiny_train_config(colour_features, out, tiny_text_tower, epochs=1))
    return out


def test_open_clip_alone_gives_taxoclips_probabilities_on_the_same_pixels(tiny_lit, tmp_path):
    from taxoclip.models.registry import load_classifier

    out = tmp_path / "exported"
    assert main(["export", "open_clip", "--model", str(tiny_lit), "-o", str(out)]) == 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "test_efficientnet"
    classifier = load_classifier(tiny_lit)
    size = classifier.image_tower.preprocess.size
    pixels = torch.randint(0, 256, (3, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    ours = classifier.probabilities_from_features(classifier.image_tower.embed(pixels))
    theirs = open_clip_alone(out, tmp_path / "pixels.npy")
    assert np.abs(np.array(theirs["probabilities"]) - ours.numpy()).max() < 1e-4
    # open_clip's tokenizer and text tower re-make the classifier from the captions
    assert np.abs(np.array(theirs["text"]) - classifier.class_embeddings.numpy()).max() < 1e-4
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "open_clip" and "local-dir:THIS_FOLDER" in card.text


def test_the_hub_form_names_the_text_tower_by_its_hub_id_or_refuses(tiny_lit, tmp_path):
    from taxoclip.inference.open_clip_export import export_open_clip, text_config_name

    assert text_config_name("minilm-l6", tmp_path, True) == "sentence-transformers/all-MiniLM-L6-v2"
    assert text_config_name("hf:org/encoder", tmp_path, True) == "org/encoder"
    with pytest.raises(TaxoclipError, match="no Hugging Face hub id"):
        export_open_clip(tiny_lit, tmp_path / "hub", text_config_from_hub=True)  # its tower is a local folder
    assert not any((tmp_path / "hub").glob("*.json"))


def test_export_refuses_a_label_layer_kind_and_names_onnx(colour_features, tmp_path, capsys):
    from taxoclip.train.catlip import CatLIPConfig, train_catlip

    catlip = tmp_path / "catlip"
    train_catlip(CatLIPConfig(features=str(colour_features), output=str(catlip), epochs=1, progress=False))
    assert main(["export", "open_clip", "--model", str(catlip), "-o", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "label layer" in error and "export onnx" in error
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_write_into_a_folder_with_files(tiny_lit, tmp_path):
    from taxoclip.inference.open_clip_export import export_open_clip

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TaxoclipError, match="not empty"):
        export_open_clip(tiny_lit, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_real_towers_on_real_photos_open_in_open_clip_and_pybioclip(quick_demo, flowers, tmp_path):
    """The quick demo's LiT (pretrained EfficientNet-Lite0 and MiniLM, 5 flower species) exported:
    open_clip alone reproduces taxoclip's probabilities on the same pixels, names the same species
    through its own transform, and pybioclip (Python and its command line) names it too."""
    import taxoclip
    from taxoclip.inference.open_clip_export import export_open_clip

    model_dir, out = quick_demo / "model", tmp_path / "exported"
    export_open_clip(model_dir, out)
    model = taxoclip.load(model_dir)
    photos = [p for class_id in model.classes.ids for p in sorted((flowers / "valid" / class_id).glob("*.jpg"))[:2]]
    pixels = torch.stack([model.image_tower.preprocess.to_uint8(Image.open(p)) for p in photos])
    expected = model.probabilities_from_features(model.image_tower.embed(pixels)).numpy()
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    same_pixels = np.array(open_clip_alone(out, tmp_path / "pixels.npy")["probabilities"])
    assert np.abs(same_pixels - expected).max() < 1e-4
    # through open_clip's own transform (a crop at 1.0 where taxoclip's is at 0.875): the same answers
    own_transform = np.array(open_clip_alone(out, *photos)["probabilities"])
    gap = np.abs(own_transform - expected).max()
    assert (own_transform.argmax(1) == expected.argmax(1)).all(), f"largest probability gap {gap:.3f}"

    import open_clip

    # as pybioclip uses it, in training mode: the text side has no dropout left to make it random
    clip = open_clip.create_model(f"local-dir:{out}")
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(names := (out / "classes.txt").read_text().splitlines())
    with torch.no_grad():
        assert clip.training and torch.equal(clip.encode_text(tokens), clip.encode_text(tokens))
    from bioclip import CustomLabelsClassifier
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(disable=True):  # pybioclip compiles the model: seconds, not minutes
        bioclip = CustomLabelsClassifier(cls_ary=names, model_str=f"local-dir:{out}")
        bioclip.model.eval()  # pybioclip leaves open_clip's model in training mode (BatchNorm)
        answers = [names.index(row["classification"]) for row in bioclip.predict([str(p) for p in photos], k=1)]
    # its own prompt templates around the names, not the model's captions: nearly always the same answer
    assert sum(a == b for a, b in zip(answers, expected.argmax(1), strict=True)) >= len(photos) - 1, answers


def test_pybioclips_command_line_runs_an_export(colour_shards, tiny_text_tower, tmp_path):
    """pybioclip's command line on an export whose image tower has no BatchNorm (a ViT): the answer
    its Python API gives in evaluation mode (its command line never calls eval())."""
    pytest.importorskip("bioclip")
    from torch._dynamo import config as dynamo_config

    from conftest import tiny_train_config
    from taxoclip.inference.open_clip_export import export_open_clip
    from taxoclip.models.extraction import extract_features
    from taxoclip.train.lit import train_lit

    features = tmp_path / "features"
    extract_features(colour_shards, "timm:test_vit", features, pretrained=False, workers=0, progress=False)
    train_lit(tiny_train_config(features, tmp_path / "model", tiny_text_tower, epochs=1))
    out = export_open_clip(tmp_path / "model", tmp_path / "exported")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 40)).save(photo)
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "bioclip"), "predict", "--cls", str(out / "classes.txt"),
         "--model", f"local-dir:{out}", "--k", "2", "--format", "csv", str(photo)],
        capture_output=True, text=True, check=False,
        env=os.environ | {"TORCH_COMPILE_DISABLE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    rows = list(csv.DictReader(io.StringIO(cli.stdout)))
    from bioclip import CustomLabelsClassifier

    with dynamo_config.patch(disable=True):
        names = (out / "classes.txt").read_text().splitlines()
        reference = CustomLabelsClassifier(cls_ary=names, model_str=f"local-dir:{out}")
        reference.model.eval()
        expected = reference.predict([str(photo)], k=2)
    assert [r["classification"] for r in rows] == [e["classification"] for e in expected]
    assert [float(r["score"]) for r in rows] == pytest.approx([e["score"] for e in expected], abs=1e-4)
