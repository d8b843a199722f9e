"""taxoclip: turn a labelled collection of organism photos into a vision-language species identifier.

The library API follows the data flow: `taxoclip.data.sources.load_source` (class table + samples),
`taxoclip.data.captions.build_captions`, `taxoclip.data.shards.write_shards` / `verify_shards`,
`taxoclip.data.features.extract_features`, `taxoclip.train.lit.train_lit`, and `taxoclip.load(model_dir)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Rank, Sample

__all__ = ["ClassTable", "Dataset", "Rank", "Sample", "TaxoclipError", "load"]

if TYPE_CHECKING:
    from taxoclip.models.bundle import SpeciesModel


def load(path: str | Path) -> SpeciesModel:
    """Open a trained model directory (see `taxoclip.models.bundle.load`); imported on use, so that
    `import taxoclip` stays light."""
    from taxoclip.models.bundle import load as load_bundle

    return load_bundle(path)


__version__ = "0.1.0"
