"""taxoclip: turn a labelled collection of organism photos into a vision-language species identifier.

The library API follows the data flow: `taxoclip.data.sources.load_source` (class table + samples),
`taxoclip.data.captions.build_captions`, `taxoclip.data.shards.write_shards` / `verify_shards`,
`taxoclip.models.extraction.extract_features`, `taxoclip.train.lit.train_lit`, and `taxoclip.load(model)`
for any model (a trained model directory of any kind, or ``open_clip:NAME`` with ``classes=``), and
`taxoclip.predict(model, photos)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Rank, Sample

__all__ = ["ClassTable", "Dataset", "Rank", "Sample", "TaxoclipError", "load", "predict"]

if TYPE_CHECKING:
    from taxoclip.models.classifier import Classifier


def load(spec: str | Path, **options) -> Classifier:
    """Open a model as a `Classifier` (see `taxoclip.models.registry.load_classifier`); imported on
    use, so that `import taxoclip` stays light."""
    from taxoclip.models.registry import load_classifier

    return load_classifier(spec, **options)


def predict(model: str | Path | Classifier, photos, **options) -> list:
    """Predictions for photo paths or PIL images with a model (a `Classifier`, or anything `load`
    opens): top-k species with lineage, ``rank=`` the answer at a rank, ``subset=`` taxa to choose
    among, ``threshold=`` the confidence of the honest deepest rank (`taxoclip.inference.predict`)."""
    from taxoclip.inference.predict import predict as predict_with

    classifier = model if not isinstance(model, str | Path) else load(model)
    return predict_with(classifier, photos, **options)


__version__ = "0.1.0"
