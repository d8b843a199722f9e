"""CatLIP's settings: the library's defaults, which the command line shows (no torch to import)."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.data.labels import EXTRACTORS, SCORINGS
from taxoclip.errors import TaxoclipError
from taxoclip.train.depth_config import DEPTHS, DepthSettings

__all__ = ["DEPTHS", "SCORINGS", "CatLIPConfig"]


@dataclass
class CatLIPConfig(DepthSettings):
    """CatLIP's own settings; the depth and the data come from `DepthSettings`."""

    vocabulary: str | None = None  # a vocabulary.json from 'taxoclip labels'; default: built from the features
    extractor: str = "taxonomy"
    style: str = "paper"  # the caption style the wordnet extractor reads
    min_count: int = 1  # V_tau: labels carried by fewer training images are dropped
    max_size: int | None = None  # at most this many labels, the most frequent
    batch_size: int = 512
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    max_steps_per_epoch: int | None = None  # for benchmarks: a partial epoch
    scoring: str = "likelihood"  # how evaluation turns label logits into class scores (models.catlip)

    def check(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise TaxoclipError(f"unknown label extractor {self.extractor!r}; use one of {', '.join(EXTRACTORS)}")
        if self.scoring not in SCORINGS:
            raise TaxoclipError(f"unknown scoring {self.scoring!r}; use one of {', '.join(SCORINGS)}")
        self.check_depth()
