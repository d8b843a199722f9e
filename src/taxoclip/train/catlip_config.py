"""CatLIP's settings: the library's defaults, which the command line shows (no torch to import)."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.data.labels import EXTRACTORS
from taxoclip.errors import TaxoclipError

# head: the label layer on cached embeddings; upper: the tower's last --train-blocks stages too, on
# cached activations of the stages below; full: the whole tower, on augmented photos.
DEPTHS = ("head", "upper", "full")


@dataclass
class CatLIPConfig:
    output: str
    features: str | None = None  # depth head: the feature cache
    shards: str | None = None  # depth upper: the photos, whose lower-stage activations are cached once
    tower: str = "efficientnet-lite0"  # depth upper: the image tower to cut
    pretrained: bool = True  # False: the tower's architecture with random weights (tests)
    train_blocks: int = 1  # depth upper: how many final stages train
    activations: str | None = None  # depth upper: the activation cache (default OUTPUT/activations)
    tower_lr: float = 1e-4  # depths upper and full: learning rate of the tower's stages
    augment: bool = True  # depth full: random resized crops and flips
    vocabulary: str | None = None  # a vocabulary.json from 'taxoclip labels'; default: built from the features
    extractor: str = "taxonomy"
    style: str = "paper"  # the caption style the wordnet extractor reads
    min_count: int = 1  # V_tau: labels carried by fewer training images are dropped
    max_size: int | None = None  # at most this many labels, the most frequent
    depth: str = "head"  # what trains: "head" = the label layer on cached embeddings
    batch_size: int = 512
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 5.0
    holdout: int = 0  # classes kept out of training, scored zero-shot through their shared labels
    holdout_seed: int = 0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    max_steps_per_epoch: int | None = None  # for benchmarks: a partial epoch
    scoring: str = "likelihood"  # how evaluation turns label logits into class scores (models.catlip)
    progress: bool = True

    def check(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise TaxoclipError(f"unknown label extractor {self.extractor!r}; use one of {', '.join(EXTRACTORS)}")
        if self.depth not in DEPTHS:
            raise TaxoclipError(
                f"--depth {self.depth}: use one of {', '.join(DEPTHS)} (the whole tower is not built yet)"
            )
        if self.depth == "head" and not self.features:
            raise TaxoclipError("--depth head trains on cached embeddings: give --features (from 'taxoclip features')")
        if self.depth in ("upper", "full") and not self.shards:
            raise TaxoclipError(f"--depth {self.depth} runs the tower on the photos: give --shards")
        if self.batch_size < 1 or self.epochs < 1:
            raise TaxoclipError("--batch-size and --epochs must be at least 1")
