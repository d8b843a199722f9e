"""Ranks, the class table and the sample list: what every source is turned into.

A *class table* has one row per class: a stable string ``id`` (the folder name, the iNat
category id, ...), a contiguous ``index`` used by models, every taxonomic rank, the common name,
and whatever extra columns the source had. A *sample* is one image: its path, its class id and
its split. Everything downstream (captions, shards, features, training) reads these two.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from taxoclip.errors import TaxoclipError


class Rank(IntEnum):
    """Taxonomic ranks from the broadest to the narrowest; comparable (KINGDOM < SPECIES)."""

    KINGDOM = 0
    PHYLUM = 1
    CLASS = 2
    ORDER = 3
    FAMILY = 4
    GENUS = 5
    SPECIES = 6

    @property
    def column(self) -> str:
        """The class-table column holding this rank (``species`` holds the binomial)."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Rank:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(r.column for r in cls)
            raise TaxoclipError(f"unknown rank {text!r}: use one of {names}") from None


RANK_COLUMNS: tuple[str, ...] = tuple(r.column for r in Rank)
# The probability an answer's rank must reach to be given plainly (predict's honest rank, grounded
# question answering's "probably ...; the species is uncertain"); measured on flowers valid.
HONEST_THRESHOLD = 0.5
# Columns every class table has, in this order, before any extra columns of the source.
CORE_COLUMNS: tuple[str, ...] = (
    "index",
    "id",
    *RANK_COLUMNS,
    "specific_epithet",
    "scientific_name",
    "common_name",
    "supercategory",
)

# Other spellings seen in real metadata files, mapped onto our column names.
COLUMN_ALIASES: dict[str, str] = {
    "cls": "class",
    "taxonomic_class": "class",
    "epithet": "specific_epithet",
    "species_epithet": "specific_epithet",
    "binomial": "scientific_name",
    "scientific name": "scientific_name",
    "common name": "common_name",
    "vernacular_name": "common_name",
    "english_name": "common_name",
    "class_id": "id",
    "category_id": "id",
    "label": "id",
}


def natural_key(text: str) -> tuple:
    """Sort "2" before "10" and "img2" before "img10"."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text))


def _clean(value: object) -> str:
    return "" if value is None else " ".join(str(value).split())


def complete_ranks(row: dict[str, str]) -> dict[str, str]:
    """Fill what can be derived: genus and epithet from a binomial, and the binomial from them.

    ``species`` is the binomial when the class is known to species level and empty otherwise;
    ``scientific_name`` is the narrowest name known (the binomial, or the genus, or ...).
    """
    out = {k: _clean(v) for k, v in row.items()}
    name = out.get("scientific_name", "")
    words = name.split()
    if not out.get("genus") and len(words) >= 2 and words[0][:1].isupper():
        out["genus"] = words[0]
    if not out.get("specific_epithet") and len(words) >= 2 and words[0] == out.get("genus"):
        out["specific_epithet"] = " ".join(words[1:])
    if not out.get("species") and out.get("genus") and out.get("specific_epithet"):
        out["species"] = f"{out['genus']} {out['specific_epithet']}"
    out.setdefault("species", "")
    out.setdefault("scientific_name", "")
    if not name:
        out["scientific_name"] = next((out[rank] for rank in reversed(RANK_COLUMNS) if out.get(rank)), "")
    return out


@dataclass
class ClassTable:
    """One row per class, in model index order. Rows are plain ``dict[str, str]``."""

    rows: list[dict[str, str]]
    extra_columns: list[str] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: Iterable[dict[str, object]], *, origin: str) -> ClassTable:
        """Build a table from rows that each have an ``id``; rows keep the order given.

        ``origin`` names the file the rows came from, for error messages.
        """
        rows: list[dict[str, str]] = []
        seen: dict[str, int] = {}
        extras: list[str] = []
        for line, record in enumerate(records, start=1):
            normalised = {COLUMN_ALIASES.get(k.strip().lower(), k.strip().lower()): v for k, v in record.items() if k}
            row = complete_ranks(normalised)
            class_id = row.get("id", "")
            if not class_id:
                raise TaxoclipError(f"{origin}: class row {line} has no id; every class needs one")
            if class_id in seen:
                raise TaxoclipError(
                    f"{origin}: duplicate class id {class_id!r} (rows {seen[class_id]} and {line}); "
                    "each class must appear once"
                )
            seen[class_id] = line
            for key in row:
                if key not in CORE_COLUMNS and key not in extras:
                    extras.append(key)
            rows.append(row)
        if not rows:
            raise TaxoclipError(f"{origin}: no classes found")
        table_rows = []
        for index, row in enumerate(rows):
            full = {column: row.get(column, "") for column in CORE_COLUMNS}
            full.update({column: row.get(column, "") for column in extras})
            full["index"] = str(index)
            table_rows.append(full)
        return cls(table_rows, extras)

    @property
    def columns(self) -> list[str]:
        return [*CORE_COLUMNS, *self.extra_columns]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, str]]:
        return iter(self.rows)

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    def index_of(self) -> dict[str, int]:
        return {row["id"]: i for i, row in enumerate(self.rows)}

    def lineage(self, index: int) -> dict[Rank, str]:
        """The class's name at every rank (empty where unknown)."""
        row = self.rows[index]
        return {rank: row.get(rank.column, "") for rank in Rank}

    def values_at(self, column: str) -> tuple[list[str], np.ndarray]:
        """A column's distinct non-empty values (sorted) and each class's index among them
        (``len(values)`` for a class with none): per-value sums are then one bincount."""
        names = [row.get(column, "") for row in self.rows]
        distinct = sorted(set(names) - {""})
        where = {v: i for i, v in enumerate(distinct)}
        return distinct, np.array([where.get(n, len(distinct)) for n in names], dtype=np.int64)

    def filled_columns(self) -> list[str]:
        """Columns with a value for at least one class."""
        return [c for c in self.columns if any(row.get(c) for row in self.rows)]

    def subset(self, ids: Sequence[str]) -> ClassTable:
        """The classes with these ids, re-indexed in the order given."""
        by_id = {row["id"]: row for row in self.rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise TaxoclipError(f"unknown class ids: {', '.join(missing[:5])}")
        return ClassTable.from_records(
            ({k: v for k, v in by_id[i].items() if k != "index"} for i in ids), origin="subset"
        )

    def to_csv(self, path: str | Path) -> None:
        columns = [c for c in self.columns if c in ("index", "id") or any(row.get(c) for row in self.rows)]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    @classmethod
    def from_csv(cls, path: str | Path) -> ClassTable:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        return cls.from_records(({k: v for k, v in r.items() if k != "index"} for r in rows), origin=str(path))

    def to_json(self) -> list[dict[str, str]]:
        return [dict(row) for row in self.rows]

    @classmethod
    def from_json(cls, rows: list[dict[str, str]]) -> ClassTable:
        return cls.from_records(({k: v for k, v in r.items() if k != "index"} for r in rows), origin="manifest")


@dataclass(frozen=True, slots=True)
class Sample:
    """One image of the dataset: where it is, which class it shows, which split it belongs to.
    Slotted: iNat2021 has 2.7M of them, and a per-object dict would add ~100 bytes each."""

    path: str
    class_id: str
    split: str


SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid", "training": "train", "testing": "test"}
KNOWN_SPLITS = ("train", "valid", "test")


def normalise_split(name: str) -> str:
    lowered = name.strip().lower()
    return SPLIT_ALIASES.get(lowered, lowered)


@dataclass
class Dataset:
    """What a source yields: the class table, the samples, and a description of where it came from."""

    classes: ClassTable
    samples: list[Sample]
    source: dict[str, str]

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in KNOWN_SPLITS if s in present] + sorted(present - set(KNOWN_SPLITS))

    def only_split(self, split: str | None) -> Dataset:
        if split is None:
            return self
        split = normalise_split(split)
        chosen = [s for s in self.samples if s.split == split]
        if not chosen:
            have = ", ".join(self.splits) or "none"
            raise TaxoclipError(
                f"split {split!r} has no images in {self.source.get('path', 'the source')} (splits: {have})"
            )
        return Dataset(self.classes, chosen, self.source)

    def check_sample_classes(self) -> None:
        """Every sample's class must be in the class table: say which are not, and where."""
        known = set(self.classes.ids)
        unknown: dict[str, str] = {}
        for sample in self.samples:
            if sample.class_id not in known and sample.class_id not in unknown:
                unknown[sample.class_id] = sample.path
        if unknown:
            listed = "; ".join(f"{c!r} (e.g. {p})" for c, p in list(unknown.items())[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            origin = self.source.get("classes", self.source.get("path", "the class metadata"))
            raise TaxoclipError(
                f"{len(unknown)} class(es) have images but no row in {origin}: {listed}{more}. "
                "Add a row for each, or remove those images."
            )
