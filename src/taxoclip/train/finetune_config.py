"""Supervised fine-tuning's settings: the library's defaults, which the command line shows."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from taxoclip.errors import TaxoclipError
from taxoclip.flag_types import NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE, fraction_below_one, probability
from taxoclip.train.depth_config import DepthSettings
from taxoclip.train.settings import LoopSettings, option, redefault

HEADS = ("linear", "mlp")


@dataclass(kw_only=True)
class FinetuneConfig(DepthSettings):
    """The depth and data come from `DepthSettings`; a tenth of train is the selection split by
    default, on which early stopping and `train sweep` choose."""

    select_fraction: float = redefault(DepthSettings, "select_fraction", 0.1)
    head: str = option("linear", "--head", help="the classifier on the tower's features", choices=HEADS)
    hidden: int = option(1024, "--hidden", help="the MLP head's hidden width", type=POSITIVE)
    balance: int | None = option(
        None, "--balance", help="N: every class gets N images per epoch, over/under-sampled", type=POSITIVE
    )
    class_weighted: bool = option(
        False,
        "--class-weighted",
        help="loss weights inversely proportional to class size (instead of --balance)",
        action=argparse.BooleanOptionalAction,
    )
    label_smoothing: float = option(
        0.0, "--label-smoothing", help="label smoothing of the targets", type=fraction_below_one
    )
    mixup: float = option(0.0, "--mixup", help="mixup alpha, --depth full (0: off)", type=NON_NEGATIVE_NUMBER)
    cutmix: float = option(0.0, "--cutmix", help="cutmix alpha, --depth full (0: off)", type=NON_NEGATIVE_NUMBER)
    layer_decay: float = option(
        1.0, "--layer-decay", help="per-stage learning-rate decay down the tower (1: off)", type=probability
    )
    ema: float = option(
        0.0,
        "--ema",
        help="decay of a moving average of the weights, used for eval and saving (0: off)",
        type=fraction_below_one,
    )
    patience: int = option(
        0, "--patience", help="stop after this many evaluations without a better selection top-1", type=NON_NEGATIVE
    )
    accumulate: int = option(1, "--accumulate", help="batches whose gradients make one optimiser step", type=POSITIVE)
    batch_size: int = redefault(LoopSettings, "batch_size", 256)
    epochs: int = redefault(LoopSettings, "epochs", 20)
    lr: float = redefault(LoopSettings, "lr", 1e-3, help="learning rate of the head")
    grad_clip: float = redefault(LoopSettings, "grad_clip", 5.0)

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


def summary(final: dict, settings: FinetuneConfig) -> list[str]:
    """What `taxoclip train finetune` prints when done."""
    lines = []
    if "top1" in final:
        lines.append(
            f"valid: top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%, "
            f"balanced {100 * final['balanced']:.1f}%"
        )
    if "select_top1" in final:
        lines.append(f"selection split: top-1 {100 * final['select_top1']:.1f}%")
    return [*lines, f"model in {settings.output} (kind finetune: predict, eval, serve and export open it)"]
