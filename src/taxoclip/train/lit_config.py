"""LiT's settings: the library's defaults, which the command line shows and uses as its own.
Importing this is instant (no torch), so `taxoclip --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from taxoclip.errors import TaxoclipError

LOSSES = ("class", "clip")
PROJECTION_INITS = ("ridge", "random")


@dataclass
class TrainConfig:
    features: str
    output: str
    text_tower: str = "minilm-l6"
    styles: list[str] = field(default_factory=lambda: ["paper"])  # sampled per class per step
    eval_style: str = "paper"
    loss: str = "class"  # "class" (class-aware) or "clip"
    batch_size: int = 512
    epochs: int = 10
    lr: float = 1e-3  # projections and temperature
    text_lr: float = 1e-4  # the text tower's trainable blocks
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    text_layers: int | None = 2
    image_projection: bool = True  # a linear map on the locked embeddings: 96.6% vs 94.0% on flowers
    embed_dim: int | None = None
    projection_init: str = "ridge"  # "ridge" or "random"
    # hierarchy-aware targets: genus/family/order captions contrasted too, and added to each class's
    # embedding with this weight (0: species captions alone)
    rank_weight: float = 0.0
    holdout: int = 0  # classes held out of training, to measure zero-shot on unseen classes
    holdout_seed: int = 0
    seed: int = 0
    device: str = "auto"
    image_in_loop: bool = False
    shards: str | None = None  # the images, for image_in_loop
    unlock_image: bool = False
    max_steps_per_epoch: int | None = None  # for benchmarks: a partial epoch
    eval_every: int = 1  # epochs between zero-shot evaluations (the last epoch is always evaluated)
    progress: bool = True

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise TaxoclipError(f"unknown loss {self.loss!r}; use 'class' or 'clip'")
        if self.projection_init not in PROJECTION_INITS:
            raise TaxoclipError(f"unknown projection init {self.projection_init!r}; use 'ridge' or 'random'")
        if (self.image_in_loop or self.unlock_image) and not self.shards:
            raise TaxoclipError("--image-in-loop and --unlock-image need --shards (the images)")
        if self.batch_size < 2:
            raise TaxoclipError("--batch-size must be at least 2 for a contrastive loss")
