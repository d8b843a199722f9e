"""A trainer that exists only in the tests, for the `toy` model kind (tests/toy_kind.py): class
means learned by gradient descent on the cached embeddings, scored as the nearest class mean. It
is the whole cost of a new trainer: its settings (a `LoopSettings` dataclass), a `Trainer` on the
shared loop, a train function, and one line in `taxoclip.train.registry.TRAINERS`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import MISSING, dataclass

import numpy as np
import torch

from taxoclip.data.features import load_features
from taxoclip.flag_types import NON_NEGATIVE_NUMBER
from taxoclip.models.bundle import write_config
from taxoclip.runtime import Runtime
from taxoclip.train.loop import Batch, Trainer, run_training
from taxoclip.train.settings import LoopSettings, option, redefault


@dataclass(kw_only=True)
class ToySettings(LoopSettings):
    features: str = option(MISSING, "--features", help="feature cache from 'taxoclip features'")
    spread: float = option(
        1.0, "--spread", help="how far from the global mean the class means start", type=NON_NEGATIVE_NUMBER
    )
    epochs: int = redefault(LoopSettings, "epochs", 2)
    batch_size: int = redefault(LoopSettings, "batch_size", 16)

    def check(self) -> None:
        pass


class NearestMean(torch.nn.Module):
    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.means = torch.nn.Parameter(means)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.means.T - (self.means**2).sum(1) / 2

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(features), labels)


class ToyTrainer(Trainer):
    def __init__(self, settings: ToySettings, runtime: Runtime):
        self.settings, self.runtime = settings, runtime
        self.cache = load_features(settings.features)
        x, y = self.cache.split("train")
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y).long()
        centre = self.x.mean(0)
        means = torch.stack([self.x[self.y == c].mean(0) for c in range(len(self.cache.classes))])
        self.module = NearestMean(centre + settings.spread * (means - centre))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.module.parameters()), "lr": self.settings.lr, "weight_decay": 0.0}]

    def steps_per_epoch(self) -> int:
        return max(1, len(self.y) // self.settings.batch_size)

    def batches(self, epoch: int) -> Iterator[Batch]:
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, self.steps_per_epoch() * self.settings.batch_size, self.settings.batch_size):
            rows = order[start : start + self.settings.batch_size]
            yield Batch({"features": self.x[rows], "labels": self.y[rows]}, len(rows))

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        x, y = (torch.from_numpy(a) for a in self.cache.split("valid"))
        return {"top1": float((self.module.logits(x).argmax(1) == y).float().mean())}


def train_toy(settings: ToySettings) -> dict:
    trainer, history, runtime = run_training(settings, ToyTrainer, lambda t: t.cache.meta["cache_key"])
    if runtime.is_main:  # the `toy` kind's directory: class means, classes, the tower
        from pathlib import Path

        out = Path(settings.output)
        np.save(out / "means.npy", trainer.module.means.detach().numpy().astype(np.float32))
        trainer.cache.classes.to_csv(out / "classes.csv")
        write_config(out, "toy", {"image_tower": trainer.cache.meta["tower"]})
    return history[-1]


def summary(final: dict, settings: ToySettings) -> list[str]:
    return [f"toy: valid top-1 {100 * final['top1']:.1f}% -> {settings.output}"]
