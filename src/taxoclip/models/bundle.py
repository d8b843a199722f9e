"""A trained model is a directory. Whatever its kind, it holds

config.json    {"version", "kind", ...}: the kind tells the registry which module opens it
classes.csv    the class table, in index order
README.md      the model card (Hugging Face format), made again as the directory grows

and each kind adds its own files (LiT: see `taxoclip.models.lit`). `taxoclip.load` and
`taxoclip.models.registry.load_classifier` open any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable

BUNDLE_VERSION = 1


def write_config(out: Path, kind: str, fields: dict) -> None:
    """config.json, and the directory's model card made from it (`models.model_card`)."""
    from taxoclip.models.model_card import write_model_card

    out.mkdir(parents=True, exist_ok=True)
    config = {"version": BUNDLE_VERSION, "kind": kind, **fields}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_model_card(out)


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.exists():
        raise TaxoclipError(
            f"{path}: not a taxoclip model (no config.json); train one with 'taxoclip train lit', "
            "or name an open_clip model as open_clip:NAME"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TaxoclipError(f"{config_path}: not valid JSON ({error}); the model directory is damaged") from None
    check_config_types(config_path, config)
    if config.get("version", BUNDLE_VERSION) > BUNDLE_VERSION:
        raise TaxoclipError(f"{path}: written by a newer taxoclip (format {config['version']}); upgrade taxoclip")
    return config


# The fields every kind shares, and their JSON types; a kind's loader checks its own on use.
CONFIG_TYPES = {"version": int, "kind": str, "image_tower": dict, "training": dict, "lit": dict}


def check_config_types(config_path: Path, config) -> None:
    """A config.json that is an object whose shared fields have their types (a hand-edited or
    crafted file with ``"kind": ["lit"]`` is named, not a traceback)."""
    if not isinstance(config, dict):
        raise TaxoclipError(
            f"{config_path}: a JSON {type(config).__name__} where a model's settings (an object) belong; "
            "the model directory is damaged"
        )
    for name, kind in CONFIG_TYPES.items():
        if name in config and not (isinstance(config[name], kind) and not isinstance(config[name], bool)):
            raise TaxoclipError(
                f"{config_path}: {name!r} is {json.dumps(config[name])[:60]}, not a JSON "
                f"{ {int: 'integer', str: 'string', dict: 'object'}[kind] }; the model directory is damaged"
            )


def save_weights(path: Path, module: torch.nn.Module) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))


def read_classes(path: Path) -> ClassTable:
    if not (path / "classes.csv").exists():
        raise TaxoclipError(f"{path}: the model directory has no classes.csv; copy the whole directory")
    return ClassTable.from_csv(path / "classes.csv")
