"""The settings every tower-depth trainer shares (CatLIP, fine-tuning): light, for the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from taxoclip.errors import TaxoclipError
from taxoclip.flag_types import NON_NEGATIVE_NUMBER, POSITIVE, fraction_below_one
from taxoclip.train.settings import HoldoutSettings, LoopSettings, option

# head: a head on the locked tower's cached embeddings; upper: the tower's last --train-blocks
# stages too, on cached activations of the stages below; full: the whole tower, on augmented photos.
DEPTHS = ("head", "upper", "full")


@dataclass(kw_only=True)
class DepthSettings(LoopSettings, HoldoutSettings):
    """The settings of `TowerSource` (shared by the trainers' configs)."""

    depth: str = option(
        "head",
        "--depth",
        help="what trains: the head, the tower's upper stages too, or the whole tower",
        choices=DEPTHS,
    )
    features: str | None = option(None, "--features", help="feature cache from 'taxoclip features' (for --depth head)")
    shards: str | None = option(
        None, "--shards", help="the photos' shards (--depth upper: lower stages cached once; --depth full)"
    )
    tower: str = option(
        "efficientnet-lite0",
        "--tower",
        help="image tower that trains (--depth upper, full): efficientnet-lite0/1/2, timm:NAME",
    )
    pretrained: bool = option(
        True,
        "--random-weights",
        help="the tower's architecture with random weights (from scratch)",
        action="store_false",
    )
    train_blocks: int = option(
        1, "--train-blocks", help="final stages of the tower that train, for --depth upper", type=POSITIVE
    )
    activations: str | None = option(
        None, "--activations", help="activation cache folder for --depth upper (default OUTPUT/activations)"
    )
    tower_lr: float = option(
        1e-4, "--tower-lr", help="learning rate of the tower's stages (--depth upper, full)", type=NON_NEGATIVE_NUMBER
    )
    augment: bool = option(
        True, "--augment", help="random crops and flips (--depth full)", action=argparse.BooleanOptionalAction
    )
    select_fraction: float = option(
        0.0, "--select", help="share of train kept out to choose settings on", type=fraction_below_one
    )
    select_seed: int = option(0, "--select-seed", help="which training photos form the selection split", type=int)

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
        if self.batch_size < 1 or self.epochs < 1:
            raise TaxoclipError("--batch-size and --epochs must be at least 1")
        if not 0 <= self.select_fraction < 1:
            raise TaxoclipError(f"--select {self.select_fraction}: a fraction of train, 0 (none) to below 1")
