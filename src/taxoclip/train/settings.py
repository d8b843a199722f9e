"""Every trainer's settings are a dataclass built on `LoopSettings`: the fields the training loop
shares are declared here, once. Each field carries its command-line flags, help and value type in
its metadata (`option`); the command line builds ``train X`` and ``train sweep X`` from them, and a
sweep parses its values through them. A trainer's settings class adds its own fields and its own
defaults (`redefault`). Torch-free, so ``taxoclip --help`` stays instant."""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from taxoclip.flag_types import NON_NEGATIVE, NON_NEGATIVE_NUMBER, POSITIVE, POSITIVE_NUMBER


def option(default: Any = MISSING, *flags: str, help: str = "", factory=None, **argparse_options: Any) -> Any:
    """A settings field with its flags (none: library only), help and argparse options (``type``,
    ``choices``, ``action``). Without a default the flag is required."""
    metadata = {"flags": flags, "help": help, "argparse": argparse_options}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(settings: type, name: str, default: Any, help: str | None = None) -> Any:
    """An inherited field with this trainer's own default (and, given, its own help); its flags
    and type are kept."""
    inherited: Field = settings.__dataclass_fields__[name]
    metadata = dict(inherited.metadata) | ({"help": help} if help else {})
    return field(default=default, metadata=metadata)


def flagged(settings: type) -> list[Field]:
    """The fields of a settings class that have a command-line flag, in declaration order."""
    return [f for f in fields(settings) if f.metadata.get("flags")]


@dataclass(kw_only=True)
class LoopSettings:
    """What every trainer's loop reads (`taxoclip.train.loop.fit`)."""

    output: str = option(MISSING, "-o", "--output", help="model directory to write")
    batch_size: int = option(256, "--batch-size", help="the global batch, shared among processes", type=POSITIVE)
    epochs: int = option(10, "--epochs", help="passes over the training photos", type=POSITIVE)
    lr: float = option(1e-3, "--lr", help="learning rate", type=NON_NEGATIVE_NUMBER)
    weight_decay: float = option(1e-4, "--weight-decay", help="AdamW weight decay", type=NON_NEGATIVE_NUMBER)
    warmup_steps: int = option(20, "--warmup", help="linear warm-up steps before the cosine decay", type=NON_NEGATIVE)
    grad_clip: float = option(1.0, "--grad-clip", help="gradient norm clip", type=POSITIVE_NUMBER)
    seed: int = option(0, "--seed", help="data order, caption styles, dropout", type=int)
    device: str = option("auto", "--device", help="auto, cpu, cuda, cuda:1 ...")
    eval_every: int = option(
        1, "--eval-every", help="epochs between evaluations on valid (the last always)", type=POSITIVE
    )
    max_steps_per_epoch: int | None = option(
        None,
        "--steps-per-epoch",
        help="cap on steps per epoch: a step budget where one pass over every row is too long",
        type=POSITIVE,
    )
    progress: bool = option(True, "-q", "--quiet", help="no progress bars", action="store_false")


@dataclass(kw_only=True)
class HoldoutSettings:
    """Classes kept out of training altogether, to measure the model on classes it never saw."""

    holdout: int = option(
        0, "--holdout", help="classes left out of training, to measure unseen classes", type=NON_NEGATIVE
    )
    holdout_seed: int = option(0, "--holdout-seed", help="which classes are left out", type=int)
