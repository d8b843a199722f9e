"""taxoclip: turn a labelled collection of organism photos into a vision-language species identifier.

The library API follows the data flow: `taxoclip.data.sources.load_source` (class table + samples),
`taxoclip.data.captions.build_captions`, `taxoclip.data.shards.write_shards` / `verify_shards`,
`taxoclip.data.features.extract_features`, `taxoclip.train.lit.train_lit`, and `taxoclip.load(model)`
for any model (a trained model directory of any kind, or ``open_clip:NAME`` with ``classes=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Rank, Sample

__all__ = ["ClassTable", "Dataset", "Rank", "Sample", "TaxoclipError", "load"]

if TYPE_CHECKING:
    from taxoclip.models.classifier import Classifier


def load(spec: str | Path, **options) -> Classifier:
    """Open a model as a `Classifier` (see `taxoclip.models.registry.load_classifier`); imported on
    use, so that `import taxoclip` stays light."""
    from taxoclip.models.registry import load_classifier

    return load_classifier(spec, **options)


__version__ = "0.1.0"
