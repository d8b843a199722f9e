"""A questions file (one JSON line per question, from `taxoclip questions`) read as iNat2021's
27 million lines must be: indexed in one streamed pass into compact arrays (byte offset, cache
row and split of every question about a photo of the cache), its records read from disk only
when a batch or a sample asks for them. The whole file is never held as Python dicts (27M of
them would be tens of GB)."""

from __future__ import annotations

import heapq
import json
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from taxoclip.errors import TaxoclipError

REQUIRED = ("key", "question", "answer")


class QuestionFile:
    """The questions of ``path`` whose photos are rows of a feature cache (``row_of``: key -> row).

    ``offsets``, ``rows`` and ``split_codes`` (into ``split_names``) hold one entry per kept
    question; ``records(positions)`` reads those questions' lines back, each with its ``row``."""

    def __init__(self, path: str | Path, row_of: dict[str, int]):
        self.path = Path(path)
        if not self.path.is_file():
            raise TaxoclipError(
                f"{self.path}: no such questions file; make one with 'taxoclip questions FEATURES -o {self.path}'"
            )
        # typed arrays, 17 bytes a question (a list of Python ints would take ~100)
        offsets, rows, splits = array("q"), array("q"), array("b")
        self.split_names: list[str] = []
        code_of: dict[str, int] = {}
        self.missing = 0  # questions about photos the cache does not hold (counted, not kept)
        with open(self.path, "rb") as handle:
            offset = 0
            for line_number, line in enumerate(handle, 1):
                record = parse(line)
                if record is None:
                    raise TaxoclipError(
                        f"{self.path}, line {line_number}: not a question record ({', '.join(REQUIRED)}); "
                        "make the file with 'taxoclip questions'"
                    )
                row = row_of.get(record["key"])
                if row is None:
                    self.missing += 1
                else:
                    split = str(record.get("split"))
                    if split not in code_of:
                        code_of[split] = len(self.split_names)
                        self.split_names.append(split)
                    offsets.append(offset)
                    rows.append(row)
                    splits.append(code_of[split])
                offset += len(line)
        if not offsets:
            raise TaxoclipError(
                f"{self.path}: none of its {self.missing} questions names a photo of the feature cache; "
                "make the questions from it"
            )
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.rows = np.frombuffer(rows, dtype=np.int64)
        self.split_codes = np.frombuffer(splits, dtype=np.int8)

    def __len__(self) -> int:
        return len(self.offsets)

    def in_split(self, split: str, *, keep: bool = True) -> np.ndarray:
        """Positions of the questions about ``split`` photos (``keep=False``: all the others)."""
        code = self.split_names.index(split) if split in self.split_names else -1
        return np.flatnonzero((self.split_codes == code) == keep)

    def records(self, positions: Iterable[int]) -> list[dict]:
        """These questions' records (in the order given), each with its cache ``row``."""
        out = []
        with open(self.path, "rb") as handle:
            for position in positions:
                handle.seek(int(self.offsets[position]))
                out.append(json.loads(handle.readline()) | {"row": int(self.rows[position])})
        return out

    def iterate(self, positions: np.ndarray, chunk: int = 4096) -> Iterator[dict]:
        """These questions' records one at a time, read ``chunk`` at a time in file order."""
        for start in range(0, len(positions), chunk):
            yield from self.records(np.sort(positions[start : start + chunk]))

    def smallest(self, positions: np.ndarray, count: int | None, key: Callable[[dict], int]) -> list[dict]:
        """The ``count`` records with the smallest ``key`` (a stable hash: the same every run), in
        that order, kept in a heap so memory is bounded by ``count``; ``None``: all, sorted."""
        stream = self.iterate(positions)
        if count is None:
            return sorted(stream, key=key)
        return heapq.nsmallest(count, stream, key=key)


def parse(line: bytes) -> dict | None:
    """The record of one line, or None when it is not a question record."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not all(k in record for k in REQUIRED):
        return None
    return record
