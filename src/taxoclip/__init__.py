"""taxoclip: turn a labelled collection of organism photos into a vision-language species identifier.

The library API follows the data flow: `taxoclip.sources.load_source` (class table + samples),
`taxoclip.captions.build_captions`, `taxoclip.shards.write_shards` / `verify_shards`.
"""

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Rank, Sample

__all__ = ["ClassTable", "Dataset", "Rank", "Sample", "TaxoclipError"]
__version__ = "0.1.0"
