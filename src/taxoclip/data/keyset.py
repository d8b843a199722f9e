"""A set of photo keys held as one sorted, unique bytes array: ~14 bytes a key, where a Python set
of strings takes ~100 (270 MB for iNat2021's 2.7M training photos, held by every `train vqa` that
saves its leakage list and every `eval` that checks it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np

CHUNK = 8192  # keys encoded at a time, so no list of every key's bytes exists at once


class KeySet:
    """Sorted unique keys; ``key in keys``, ``keys.which([...])`` and sorted iteration."""

    def __init__(self, array: np.ndarray):
        self.array = array  # sorted, unique, fixed-width bytes

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeySet:
        """The set of ``keys`` (any iterable of strings, streamed a chunk at a time)."""
        array = encoded(keys)
        if len(array) > 1 and not bool(np.all(array[1:] > array[:-1])):
            array = np.unique(array)  # keys saved by `save_vqa` come sorted: no sort, no second copy
        return cls(array)

    def union(self, other: KeySet) -> KeySet:
        return KeySet(np.union1d(self.array, other.array)) if len(other) else self

    def which(self, keys: Sequence[str]) -> np.ndarray:
        """For each of ``keys``, whether it is in the set (a bool array)."""
        return locate(self.array, keys)[1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.which([key])[0])

    def __len__(self) -> int:
        return len(self.array)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.array), CHUNK):
            yield from (k.decode() for k in self.array[start : start + CHUNK].tolist())


def encoded(keys: Iterable[str]) -> np.ndarray:
    """``keys`` as one fixed-width bytes array, encoded a chunk at a time (so the encoded copies of
    every key never all exist at once as Python objects)."""
    iterator, parts = iter(keys), []
    while chunk := list(islice(iterator, CHUNK)):
        parts.append(np.array([k.encode() for k in chunk], dtype=bytes))
    return np.concatenate(parts) if parts else np.zeros(0, "S1")


def locate(ordered: np.ndarray, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Binary search of ``keys`` in the sorted bytes array ``ordered``: each key's position there
    and whether it is found (where not, the position means nothing)."""
    wanted = np.array([k.encode() for k in keys], dtype=bytes)
    if not len(wanted) or not len(ordered):
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    at = np.minimum(np.searchsorted(ordered, wanted), len(ordered) - 1)
    return at, ordered[at] == wanted  # fixed-width bytes: a longer key never matches a cut one
