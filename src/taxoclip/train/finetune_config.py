"""Supervised fine-tuning's settings: the library's defaults, which the command line shows."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.errors import TaxoclipError
from taxoclip.train.depth_config import DepthSettings

HEADS = ("linear", "mlp")


@dataclass
class FinetuneConfig(DepthSettings):
    """The depth and data come from `DepthSettings`; a tenth of train is the selection split by
    default, on which early stopping and `train sweep` choose."""

    select_fraction: float = 0.1
    head: str = "linear"  # linear | mlp
    hidden: int = 1024  # the MLP head's hidden width
    balance: int | None = None  # N: every class gets N training images per epoch, over/under-sampled
    class_weighted: bool = False  # the alternative: loss weights inversely proportional to class size
    label_smoothing: float = 0.0
    mixup: float = 0.0  # depth full: mixup alpha (0: off)
    cutmix: float = 0.0  # depth full: cutmix alpha (0: off)
    layer_decay: float = 1.0  # tower stages' learning rate shrinks by this per stage downwards (1: off)
    ema: float = 0.0  # decay of a moving average of the weights, evaluated and saved (0: off)
    patience: int = 0  # stop after this many evaluations without a better selection top-1 (0: never)
    accumulate: int = 1  # batches whose gradients add up to one optimiser step
    batch_size: int = 256
    epochs: int = 20
    lr: float = 1e-3  # the head's learning rate
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    max_steps_per_epoch: int | None = None  # for benchmarks: a partial epoch

    def check(self) -> None:
        self.check_depth()
        if self.head not in HEADS:
            raise TaxoclipError(f"--head {self.head}: use one of {', '.join(HEADS)}")
        if self.holdout:
            raise TaxoclipError(
                "--holdout: a supervised classifier has no way to name classes it never saw; measure unseen "
                "species with 'train lit --holdout' or 'train catlip --holdout'"
            )
        if self.balance is not None and self.balance < 1:
            raise TaxoclipError(f"--balance {self.balance}: images per class per epoch, at least 1")
        if self.balance and self.class_weighted:
            raise TaxoclipError("--balance and --class-weighted both correct for class sizes: choose one")
        if (self.mixup or self.cutmix) and self.depth != "full":
            raise TaxoclipError("--mixup and --cutmix mix photos: they need --depth full")
        if not 0 < self.layer_decay <= 1:
            raise TaxoclipError(f"--layer-decay {self.layer_decay}: a factor above 0 and at most 1 (1: off)")
        if not 0 <= self.ema < 1 or not 0 <= self.label_smoothing < 1:
            raise TaxoclipError("--ema and --label-smoothing are between 0 and below 1")
        if self.patience and not self.select_fraction:
            raise TaxoclipError("--patience stops on the selection split: keep --select above 0")
        if self.accumulate < 1:
            raise TaxoclipError("--accumulate must be at least 1")
