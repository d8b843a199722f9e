"""The selection split: photos carved out of train (by a hash of their key) on which settings such
as the learning rate or the per-class count are chosen and training stops early, so the number
reported on valid never chose anything.

A hash of the key, not a drawn list, decides membership: the same photo is on the same side in the
feature cache, in the cached activations and in a stream of shards, without a pass over the data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SelectionSplit:
    """``key in split`` for a fraction of train; picklable, so photo-decoding workers can filter."""

    fraction: float
    seed: int = 0
    inside: bool = True  # False: the complement (the photos that train)

    def __call__(self, key: str) -> bool:
        if self.fraction <= 0:
            return not self.inside
        digest = hashlib.blake2b(f"{self.seed}\0{key}".encode(), digest_size=8).digest()
        chosen = int.from_bytes(digest, "big") / 2**64 < self.fraction
        return chosen == self.inside

    def complement(self) -> SelectionSplit:
        return SelectionSplit(self.fraction, self.seed, not self.inside)

    def rows(self, keys: list[str], rows: np.ndarray) -> np.ndarray:
        """The given rows (indices into ``keys``) that fall on this side."""
        return rows[np.fromiter((self(keys[r]) for r in rows), dtype=bool, count=len(rows))]
