"""A model kind that exists only in the tests: a nearest-class-mean head over a timm tower's
features. It is the whole cost of a new kind: this module plus one entry in registry.KINDS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from taxoclip.models.bundle import read_classes, write_config
from taxoclip.models.classifier import Classifier


def save_toy(out: Path, cache) -> None:
    """Class means of the cache's train split as the weights of a linear head."""
    x, y = cache.split("train")
    means = np.stack([x[y == c].mean(0) for c in range(len(cache.meta["classes"]))])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "means.npy", means.astype(np.float32))
    cache.classes.to_csv(out / "classes.csv")
    write_config(out, "toy", {"image_tower": cache.meta["tower"]})


class ToyClassifier(Classifier):
    kind = "toy"

    def __init__(self, path: Path, config: dict):
        self.name, self.training, self.classes = str(path), {}, read_classes(path)
        self.image_tower_name = config["image_tower"]["name"]
        self.image_pretrained = config["image_tower"].get("pretrained", True)
        means = torch.from_numpy(np.load(path / "means.npy"))
        self.linear = torch.nn.Linear(means.shape[1], means.shape[0])
        with torch.no_grad():  # -||x - m||^2 / 2 up to a per-image constant: x.m - |m|^2 / 2
            self.linear.weight.copy_(means)
            self.linear.bias.copy_(-(means**2).sum(1) / 2)

    def head(self) -> torch.nn.Module:
        return self.linear


def load_toy(path: Path, config: dict) -> ToyClassifier:
    return ToyClassifier(path, config)


def describe(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
