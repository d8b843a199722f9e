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
    """The questions of ``path`` whose photos are rows of the feature cache ``cache``.

    ``offsets``, ``rows`` and ``split_codes`` (into ``split_names``) hold one entry per kept
    question; ``records(positions)`` reads those questions' lines back, each with its ``row``.

    The file must be about the cache's photos: the photo set its source record names (written
    beside it by 'taxoclip questions') must be the cache's, and every question's class must be the
    cache's label for its photo; either mismatch is refused with both named. Questions about photos
    the cache does not hold (a cache of one split) are counted in ``missing``."""

    def __init__(self, path: str | Path, cache):
        self.path = Path(path)
        if not self.path.is_file():
            raise TaxoclipError(
                f"{self.path}: no such questions file; make one with 'taxoclip questions FEATURES -o {self.path}'"
            )
        self.check_source(cache)
        row_of, labels, class_ids = cache.row_of(), cache.labels, cache.classes.ids
        wrong_class, first_wrong = 0, ""
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
                elif not same_class(record, int(labels[row]), class_ids):
                    wrong_class += 1
                    first_wrong = first_wrong or (
                        f"line {line_number}: photo {record['key']} is class {record.get('class_id')} in the "
                        f"questions, {class_ids[int(labels[row])]} in the cache"
                    )
                else:
                    split = str(record.get("split"))
                    if split not in code_of:
                        code_of[split] = len(self.split_names)
                        self.split_names.append(split)
                    offsets.append(offset)
                    rows.append(row)
                    splits.append(code_of[split])
                offset += len(line)
        if wrong_class:
            raise TaxoclipError(
                f"{self.path}: {wrong_class} questions name another class than {cache.path} holds for their photo "
                f"({first_wrong}): they were made from other photos; make them with 'taxoclip questions {cache.path}'"
            )
        if not offsets:
            raise TaxoclipError(
                f"{self.path}: none of its {self.missing} questions names a photo of the feature cache; "
                "make the questions from it"
            )
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.rows = np.frombuffer(rows, dtype=np.int64)
        self.split_codes = np.frombuffer(splits, dtype=np.int8)

    def check_source(self, cache) -> None:
        """Refuse a file whose source record names other photos than the cache's (keys such as
        train-0000000 exist in every cache: only this says which photos they are)."""
        from taxoclip.data.questions import source_file

        record_path = source_file(self.path)
        try:
            source = json.loads(record_path.read_text())
        except FileNotFoundError:
            return  # a file from before source records: the class check below still guards it
        except (OSError, ValueError):
            raise TaxoclipError(f"{record_path}: damaged; make the questions again with 'taxoclip questions'") from None
        theirs = source.get("photo_set") if isinstance(source, dict) else None
        if theirs and theirs != cache.photo_set:
            raise TaxoclipError(
                f"{self.path} was made from {source.get('source')} ({theirs}), but {cache.path} embeds other photos "
                f"({cache.photo_set}); make the questions from the cache's photos: 'taxoclip questions {cache.path}'"
            )

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


def same_class(record: dict, label: int, class_ids: list[str]) -> bool:
    """Whether a question's class (index and id, where it records them) is the cache's label."""
    index, class_id = record.get("class_index"), record.get("class_id")
    return (index is None or index == label) and (class_id is None or str(class_id) == class_ids[label])


def parse(line: bytes) -> dict | None:
    """The record of one line, or None when it is not a question record."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not all(k in record for k in REQUIRED):
        return None
    return record
