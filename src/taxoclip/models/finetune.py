"""Supervised fine-tuning's model: image-tower features -> a linear or MLP head over the classes,
trained with cross-entropy (optionally the tower's last stages or all of it too).

Model directory (kind ``finetune``):
  config.json              image tower, feature width, head shape, temperature, training record
  head.safetensors         the head (and the standardisation of its input)
  image_tower.safetensors  only when the tower trained too (--depth upper or full)
  classes.csv              the class table
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from taxoclip.models.classifier import DirectoryClassifier
from taxoclip.taxonomy import ClassTable


class FinetuneHead(nn.Module):
    """Standardised features -> class logits, through one linear layer or a two-layer MLP; the
    logits are divided by a temperature fitted after training (no ranking changes)."""

    def __init__(
        self,
        width: int,
        n_classes: int,
        kind: str = "linear",
        hidden: int = 1024,
        dropout: float = 0.1,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.register_buffer("mean", torch.zeros(width) if mean is None else mean.float())
        self.register_buffer("std", torch.ones(width) if std is None else std.float().clamp(min=1e-6))
        self.register_buffer("temperature", torch.ones(()))
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(width, n_classes))
        else:
            self.layers = nn.Sequential(
                nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features.float() - self.mean) / self.std) / self.temperature


def save_finetune(
    out: Path, head: FinetuneHead, classes: ClassTable, tower: dict, training: dict, image_tower=None
) -> None:
    """Write the model directory; ``image_tower`` when the tower's own stages trained too."""
    from taxoclip.models.bundle import save_weights, write_config

    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / "head.safetensors", head)
    if image_tower is not None:
        save_weights(out / "image_tower.safetensors", image_tower)
    classes.to_csv(out / "classes.csv")
    fields = {
        "image_tower": tower,
        "width": int(head.mean.shape[0]),
        "head": {"kind": head.kind, "hidden": head.hidden},
        "temperature": float(head.temperature),
        "training": training,
    }
    write_config(out, "finetune", fields)


class FinetuneClassifier(DirectoryClassifier):
    kind = "finetune"

    def __init__(self, path: Path, config: dict):
        super().__init__(path, config)
        shape = config["head"]
        self._head = FinetuneHead(config["width"], len(self.classes), shape["kind"], shape["hidden"])
        self._head.load_state_dict(load_file(str(path / "head.safetensors")))
        self._head.eval()

    def head(self) -> nn.Module:
        return self._head


def load_finetune(path: Path, config: dict) -> FinetuneClassifier:
    """The registry's entry for kind "finetune"."""
    return FinetuneClassifier(path, config)
