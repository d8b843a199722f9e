"""`taxoclip eval`'s settings, importable without torch (the command line reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    model: str  # a model directory, or open_clip:NAME
    data: str  # a feature cache, shards or a source
    output: str
    style: str | None = None  # caption style or "templates"; default: the model's own
    scoring: str | None = None  # a catlip model's class scoring (models.catlip); default: the model's own
    split: str = "valid"
    baselines: bool = True
    shots: tuple[int, ...] = (1, 5, 10)
    group_by: list[str] = field(default_factory=list)
    random_weights: bool = False  # open_clip architecture with random weights (tests, no network)
    chunk: int = 4096
    # Baselines: at most this many test rows (a seeded sample, stated in the report) and this many
    # training steps for each trained baseline, so their cost is bounded at iNat2021's size.
    baseline_rows: int | None = 20000
    baseline_steps: int = 300
    open_set: str = "auto"  # the novelty score reported on held-out species (off, auto, or a score's name)
    unknown: str | None = None  # photos of species the model does not know (a cache, shards or a source)
    progress: bool = True
