"""Export to open_clip: a LiT model as an open_clip model folder, so that open_clip itself (and
pybioclip, which is built on it) opens it with ``local-dir:OUT`` and no taxoclip installed.

The folder holds open_clip's own files: ``open_clip_config.json`` (a timm image tower whose
``head.proj`` is LiT's image side folded into one linear layer with bias, W(x - mean) = Wx - Wmean;
an HF text tower with mean or CLS pooling and LiT's text projection; the preprocessing) and
``open_clip_model.safetensors``, the text tower's ``config.json`` and tokenizer files, and beside
them the class table, the captions and the exact class embeddings taxoclip scores with.

What open_clip cannot express is refused with the reason: label-layer kinds (CatLIP, a fine-tuned
head) have no text tower to score captions with, and towers that are not timm / transformers models
have no open_clip config. ONNX export takes every kind.

One difference cannot be folded into open_clip's config: its evaluation transform resizes the
shorter side to the input size and crops it (crop fraction 1.0), where timm's towers resize to
size / 0.875 first. The weights are the same function (checked at export, to 1e-4, on the same
pixels); photos give the same answer, with probabilities that differ by what that crop changes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from taxoclip.errors import TaxoclipError
from taxoclip.models.model_card import write_open_clip_card
from taxoclip.output_lock import FOLDER_LOCK, locks_output

CONFIG, WEIGHTS, CHECK_TOLERANCE = "open_clip_config.json", "open_clip_model.safetensors", 1e-4
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TEXT_TOWER_HUB = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")
ONNX_HINT = "'taxoclip export onnx --model DIR -o model.onnx' exports every kind"


def timm_name_of(image_tower: str) -> str:
    """The timm architecture an image tower is, or a refusal naming why open_clip cannot build it."""
    from taxoclip.models.towers import OFFLINE_IMAGE_TOWERS

    if image_tower in OFFLINE_IMAGE_TOWERS:
        return OFFLINE_IMAGE_TOWERS[image_tower][0]
    if image_tower.startswith("timm:"):
        return image_tower.removeprefix("timm:").partition(".")[0]
    raise TaxoclipError(
        f"image tower {image_tower!r} is not a timm model, so open_clip's config cannot build it "
        f"(open_clip exports take efficientnet-lite* and timm:* towers); {ONNX_HINT}"
    )


def text_config_name(text_tower: str, out: Path, from_hub: bool) -> str:
    """What open_clip's ``hf_model_name`` says: the folder itself (opens with no network, as long
    as the folder stays where it is) or the tower's hub id (for uploading; transformers then reads
    the architecture's config.json from the hub)."""
    if not from_hub:
        return str(out.resolve())
    hub = TEXT_TOWER_HUB.get(text_tower)
    if hub is None and text_tower.startswith("hf:") and not Path(text_tower[3:]).exists():
        hub = text_tower[3:]
    if hub is None:
        raise TaxoclipError(
            f"text tower {text_tower!r} has no Hugging Face hub id; export without --text-config-from-hub "
            "(the folder then names itself)"
        )
    return hub


@locks_output("output")
def export_open_clip(model: str | Path, output: str | Path, *, text_config_from_hub: bool = False) -> Path:
    """Write the LiT model directory ``model`` as an open_clip model folder ``output`` and check
    that open_clip's model gives taxoclip's probabilities on the same pixels."""
    from taxoclip.models.registry import load_classifier

    classifier = load_classifier(model)
    if classifier.kind != "lit":
        reasons = {
            "catlip": "a CatLIP model classifies with a label layer over the image tower, not by scoring captions",
            "finetune": "a fine-tuned model classifies with a linear head on the image tower, not by scoring captions",
            "open_clip": "it already is an open_clip model: open it with open_clip by its own name",
        }
        why = reasons.get(classifier.kind, f"a {classifier.kind} model has no open_clip form")
        raise TaxoclipError(f"{model}: cannot export to open_clip: {why}; {ONNX_HINT}")
    lit = classifier.lit_config
    timm_name = timm_name_of(classifier.image_tower_name)
    if not (lit.text_tower in TEXT_TOWER_HUB or lit.text_tower.startswith("hf:")):
        raise TaxoclipError(
            f"{model}: text tower {lit.text_tower!r} is not a transformers encoder, which is the text tower "
            f"open_clip builds from a config; {ONNX_HINT}"
        )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise TaxoclipError(f"{out} is a file; give a new folder")
    if out.exists() and any(not p.name.startswith(FOLDER_LOCK) for p in out.iterdir()):
        raise TaxoclipError(f"{out} is not empty; give a new folder (an export never writes over files)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_folder(classifier, timm_name, out, text_config_from_hub)
    except BaseException:
        for path in out.iterdir():  # never leave half a model behind (the lock is its holder's)
            if not path.name.startswith(FOLDER_LOCK):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return out


def write_folder(classifier, timm_name: str, out: Path, text_config_from_hub: bool) -> None:
    from safetensors.torch import save_file

    lit, tower = classifier.lit_config, classifier.image_tower
    name = text_config_name(lit.text_tower, out, text_config_from_hub)  # refuse before the work
    text = classifier.model.text_tower
    # transformers builds the architecture from this. Dropout off: open_clip returns its models in
    # training mode and pybioclip never calls eval(), so dropout would make every answer random.
    config = text.model.config.to_dict() | {key: 0.0 for key in DROPOUTS if key in text.model.config.to_dict()}
    type(text.model.config).from_dict(config).save_pretrained(out)
    text.tokenizer.save_pretrained(out)  # open_clip's HFTokenizer reads a local-dir's own files
    (out / "tokenizer_config.json").write_text(
        json.dumps(json.loads((out / "tokenizer_config.json").read_text()) | {"model_max_length": text.max_length})
    )
    preprocess = tower.preprocess
    model_cfg = {
        "embed_dim": lit.embed_dim,
        "vision_cfg": {
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": timm_pool_of(tower.model),
            "timm_proj": "linear",
            "timm_proj_bias": True,
            "image_size": preprocess.size,
        },
        "text_cfg": {
            "hf_model_name": str(out.resolve()),  # to build it here; the written config may name the hub
            "hf_tokenizer_name": str(out.resolve()),
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": POOLERS[text.pooling],
            "context_length": text.max_length,
        },
    }
    clip = build_open_clip(model_cfg)
    clip.load_state_dict(open_clip_state(classifier, clip), strict=True)
    check_same_function(classifier, clip)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / WEIGHTS))
    model_cfg["text_cfg"] |= {"hf_model_name": name, "hf_tokenizer_name": name}
    preprocess_cfg = {
        "size": preprocess.size,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "interpolation": preprocess.interpolation,
        "resize_mode": "shortest",
    }
    record = {
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg,
        "taxoclip": {
            "exported_from": classifier.name,
            "kind": "lit",
            "crop_pct": preprocess.crop_pct,  # taxoclip's; open_clip's transform crops at 1.0
            "class_embeddings": "class_embeddings.npy",
            "eval_style": classifier.config.get("eval_style"),
            "rank_weight": classifier.config.get("rank_weight") or 0.0,
        },
    }
    (out / CONFIG).write_text(json.dumps(record, indent=1))
    write_classes(classifier, out)
    write_open_clip_card(out, Path(classifier.name), record)


def timm_pool_of(model) -> str:
    """The tower's own pooling (a ViT's class token, a CNN's average): open_clip resets the head with it."""
    pool = getattr(model, "global_pool", "avg")
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg")


def build_open_clip(model_cfg: dict):
    from taxoclip.models.towers import require

    require("open_clip", "open_clip_torch")
    from open_clip.model import CustomTextCLIP

    config = json.loads(json.dumps(model_cfg))
    return CustomTextCLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"]).eval()


def open_clip_state(classifier, clip) -> dict[str, torch.Tensor]:
    """taxoclip's weights under open_clip's names; the image side's centring and projection
    become one linear layer: W(x - mean) = Wx + (-W mean)."""
    lit_model, tower = classifier.model, classifier.image_tower
    width = tower.width
    projection = classifier.image_projection if classifier.image_projection is not None else torch.eye(width)
    state = {f"visual.trunk.{k}": v for k, v in tower.model.state_dict().items()}
    state["visual.head.proj.weight"] = projection.float()
    state["visual.head.proj.bias"] = -(projection.float() @ classifier.image_mean.float())
    transformer = clip.text.transformer.state_dict()
    for key, value in lit_model.text_tower.model.state_dict().items():
        if key in transformer:  # the pooler open_clip builds without (mean / CLS-state pooling)
            state[f"text.transformer.{key}"] = value
    state["text.proj.weight"] = lit_model.text_projection.weight.detach()
    state["logit_scale"] = torch.tensor(math.log(classifier.scale))
    buffers = {key for key, _ in clip.named_buffers()}
    for key, value in clip.state_dict().items():  # buffers open_clip makes itself; never a weight
        if key in buffers:
            state.setdefault(key, value)
    return state


@torch.no_grad()
def check_same_function(classifier, clip) -> None:
    """open_clip's image and text encoders must reproduce taxoclip's: the same pixels give the same
    probabilities over the class table (to 1e-4), or nothing is written."""
    tower = classifier.image_tower
    size = tower.preprocess.size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, size, size), generator=generator, dtype=torch.uint8)
    ours = classifier.probabilities_from_features(tower.embed(pixels))
    image = clip.encode_image(tower.prepare(pixels).contiguous(), normalize=True)
    theirs = (clip.logit_scale.exp() * image @ classifier.class_embeddings.float().T).softmax(-1)
    text = classifier.model.text_tower
    caption = ["A photo of a flower"]
    tokens = text.tokenize(caption)
    ours_text = classifier.model.encode_captions(caption)
    padded = torch.full((1, text.max_length), int(text.tokenizer.pad_token_id or 0), dtype=torch.long)
    padded[0, : tokens["input_ids"].shape[1]] = tokens["input_ids"][0]
    theirs_text = clip.encode_text(padded, normalize=True)
    gap = max(float((ours - theirs).abs().max()), float((ours_text - theirs_text).abs().max()))
    if not gap <= CHECK_TOLERANCE:
        raise TaxoclipError(
            f"{classifier.name}: open_clip's copy of the model differs from it by {gap:.2g} (more than "
            f"{CHECK_TOLERANCE}); nothing was written. Please report this with the model's config.json"
        )


def write_classes(classifier, out: Path) -> None:
    """The class table, its captions and the exact class embeddings, plus ``classes.txt`` (one
    scientific name a line: what pybioclip's ``--cls`` takes as a file)."""
    source = Path(classifier.name)
    for name in ("classes.csv", "captions.json"):
        shutil.copyfile(source / name, out / name)
    np.save(out / "class_embeddings.npy", classifier.class_embeddings.float().numpy())
    names = [row.get("scientific_name") or row["id"] for row in classifier.classes]
    (out / "classes.txt").write_text("\n".join(names) + "\n")
