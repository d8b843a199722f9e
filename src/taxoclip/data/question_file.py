"""A questions file (one JSON line per question, from `taxoclip questions`) read as iNat2021's
27 million lines must be: indexed in one streamed pass into compact arrays (byte offset, cache
row and split of every question about a photo of the cache), its records read from disk only
when a batch or a sample asks for them. The whole file is never held as Python dicts (27M of
them would be tens of GB)."""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from taxoclip.errors import TaxoclipError

REQUIRED = ("key", "question", "answer")
INDEXED = ("key", "split", "class_index", "class_id")  # what indexing keeps of a record, briefly
POSITION = np.int32  # a question's position in the index (iNat2021's 27M questions fit)
INDEX_CHUNK = 8192  # lines looked up together (a few MB of their indexed fields)


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
        index = Index(cache.keys, cache.labels, cache.classes.ids)
        # a chunk of lines at a time: their keys are looked up together in the cache's sorted keys
        # (never a key -> row dict of every photo), and only the fields indexing needs are kept
        chunk: list[tuple] = []  # (line number, byte offset, *INDEXED fields)
        with open(self.path, "rb") as handle:
            offset = 0
            for line_number, line in enumerate(handle, 1):
                record = parse(line)
                if record is None:
                    raise TaxoclipError(
                        f"{self.path}, line {line_number}: not a question record ({', '.join(REQUIRED)}); "
                        "make the file with 'taxoclip questions'"
                    )
                chunk.append((line_number, offset, *(record.get(k) for k in INDEXED)))
                offset += len(line)
                if len(chunk) == INDEX_CHUNK:
                    index.add(chunk)
                    chunk = []
        index.add(chunk)
        if index.wrong_class:
            raise TaxoclipError(
                f"{self.path}: {index.wrong_class} questions name another class than {cache.path} holds for their "
                f"photo ({index.first_wrong}): they were made from other photos; make them with "
                f"'taxoclip questions {cache.path}'"
            )
        self.missing = index.missing  # questions about photos the cache does not hold (counted, not kept)
        self.split_names = index.split_names
        self.offsets, self.rows, self.split_codes = index.arrays()
        if not len(self.offsets):
            raise TaxoclipError(
                f"{self.path}: none of its {self.missing} questions names a photo of the feature cache; "
                "make the questions from it"
            )

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
        step = 1 << 20  # a chunk at a time, so no int64 position array of the whole file exists
        parts = [
            np.flatnonzero((self.split_codes[start : start + step] == code) == keep).astype(POSITION) + start
            for start in range(0, len(self), step)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, POSITION)

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


class Index:
    """The growing index of a questions file: per kept question its byte offset (int64), cache row
    (int32) and split code (int8), 13 bytes; plus what was not kept, counted."""

    def __init__(self, keys, labels: np.ndarray, class_ids: list[str]):
        self.keys, self.labels, self.class_ids = keys, labels, class_ids
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.split_names: list[str] = []
        self.missing = self.wrong_class = 0
        self.first_wrong = ""

    def add(self, chunk: list[tuple]) -> None:
        """Index one chunk of lines, each (line number, byte offset, *INDEXED fields)."""
        if not chunk:
            return
        found = self.keys.rows_of([str(entry[2]) for entry in chunk])
        offsets, rows, splits = [], [], []
        for (line_number, offset, key, split, class_index, class_id), row in zip(chunk, found.tolist(), strict=True):
            if row < 0:
                self.missing += 1
            elif not same_class(class_index, class_id, int(self.labels[row]), self.class_ids):
                self.wrong_class += 1
                self.first_wrong = self.first_wrong or (
                    f"line {line_number}: photo {key} is class {class_id} in the questions, "
                    f"{self.class_ids[int(self.labels[row])]} in the cache"
                )
            else:
                if str(split) not in self.split_names:
                    self.split_names.append(str(split))
                offsets.append(offset)
                rows.append(row)
                splits.append(self.split_names.index(str(split)))
        self.parts.append((np.array(offsets, np.int64), np.array(rows, np.int32), np.array(splits, np.int8)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets, rows and split codes, each one array."""
        types = (np.int64, np.int32, np.int8)
        return tuple(
            np.concatenate([part[i] for part in self.parts]) if self.parts else np.zeros(0, t)
            for i, t in enumerate(types)
        )


def same_class(index: int | None, class_id: str | None, label: int, class_ids: list[str]) -> bool:
    """Whether a question's class (index and id, where it records them) is the cache's label."""
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
