"""The settings every tower-depth trainer shares (CatLIP, fine-tuning): light, for the command line."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.errors import TaxoclipError

# head: a head on the locked tower's cached embeddings; upper: the tower's last --train-blocks
# stages too, on cached activations of the stages below; full: the whole tower, on augmented photos.
DEPTHS = ("head", "upper", "full")


@dataclass
class DepthSettings:
    """The settings of `TowerSource` (shared by the trainers' configs)."""

    output: str
    depth: str = "head"  # head | upper | full (see the module docstring)
    features: str | None = None  # depth head: the feature cache
    shards: str | None = None  # depths upper, full: the photos
    tower: str = "efficientnet-lite0"  # depths upper, full: the image tower that trains
    pretrained: bool = True  # False: the tower's architecture with random weights (tests, from scratch)
    train_blocks: int = 1  # depth upper: how many final stages train
    activations: str | None = None  # depth upper: the activation cache (default OUTPUT/activations)
    tower_lr: float = 1e-4  # depths upper, full: learning rate of the tower's stages
    augment: bool = True  # depth full: random resized crops and flips
    holdout: int = 0  # classes kept out of training altogether
    holdout_seed: int = 0
    select_fraction: float = 0.0  # share of train kept out as the selection split (0: none)
    select_seed: int = 0
    progress: bool = True

    def settings_without_effect(self) -> set[str]:
        """Settings this depth never reads: a study that varies one would train the same run again."""
        unused = {"head": {"tower", "pretrained", "train_blocks", "tower_lr", "augment", "activations", "shards"}}
        unused["upper"] = {"augment", "features"}
        unused["full"] = {"train_blocks", "activations", "features"}
        return unused.get(self.depth, set())

    def check_depth(self) -> None:
        if self.depth not in DEPTHS:
            raise TaxoclipError(f"--depth {self.depth}: use one of {', '.join(DEPTHS)}")
        if self.depth == "head" and not self.features:
            raise TaxoclipError("--depth head trains on cached embeddings: give --features (from 'taxoclip features')")
        if self.depth in ("upper", "full") and not self.shards:
            raise TaxoclipError(f"--depth {self.depth} runs the tower on the photos: give --shards")
        if getattr(self, "batch_size", 1) < 1 or getattr(self, "epochs", 1) < 1:
            raise TaxoclipError("--batch-size and --epochs must be at least 1")
        if not 0 <= self.select_fraction < 1:
            raise TaxoclipError(f"--select {self.select_fraction}: a fraction of train, 0 (none) to below 1")
