"""CatLIP's settings: the library's defaults, which the command line shows (no torch to import)."""

from __future__ import annotations

from dataclasses import dataclass

from taxoclip.data.labels import EXTRACTORS
from taxoclip.errors import TaxoclipError

DEPTHS = ("head",)  # next: "upper" (upper blocks on cached activations), "full" (the whole tower on photos)


@dataclass
class CatLIPConfig:
    features: str
    output: str
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
    scoring: str = "likelihood"  # how evaluation turns label logits into class scores (models.catlip)
    progress: bool = True

    def check(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise TaxoclipError(f"unknown label extractor {self.extractor!r}; use one of {', '.join(EXTRACTORS)}")
        if self.depth not in DEPTHS:
            raise TaxoclipError(
                f"--depth {self.depth}: only {', '.join(DEPTHS)} (the label layer on cached embeddings) exists so far"
            )
        if self.batch_size < 1 or self.epochs < 1:
            raise TaxoclipError("--batch-size and --epochs must be at least 1")
