"""CSV metadata: a class table (one row per class) or a per-image table (one row per photo)."""

from __future__ import annotations

import csv
from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import COLUMN_ALIASES, ClassTable, Dataset, Sample, normalise_split

PATH_COLUMNS = ("filepath", "file_path", "path", "file_name", "filename", "image", "image_path")
SPLIT_COLUMNS = ("split", "subset", "partition")


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or []) if c is not None]
    except UnicodeDecodeError:
        raise TaxoclipError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as error:
        raise TaxoclipError(f"{path}: not a readable CSV ({error})") from None
    if not columns:
        raise TaxoclipError(f"{path}: empty CSV, expected a header row")
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row:  # more fields than the header names: the row is shifted, nothing is safe to read
            raise TaxoclipError(
                f"{path}, line {number}: {len(columns) + len(row[None])} fields but the header has {len(columns)}; "
                "quote fields that contain commas"
            )
    # A short row leaves its last columns empty, as a spreadsheet would.
    return columns, [{k: v if v is not None else "" for k, v in row.items()} for row in rows]


def bioclip_style(columns: list[str], rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """BioCLIP's metadata uses ``cls`` for the taxonomic class and ``class`` for the binomial."""
    if "cls" not in columns or "class" not in columns:
        return rows
    renamed = []
    for row in rows:
        row = dict(row)
        row["scientific_name"] = row.pop("class")
        row["class"] = row.pop("cls")
        if row.get("species") and row.get("genus") and not row["species"].startswith(row["genus"]):
            row["specific_epithet"] = row.pop("species")
        renamed.append(row)
    return renamed


def find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def class_key_column(columns: list[str], rows: list[dict[str, str]], wanted: str | None, origin: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise TaxoclipError(f"{origin}: no column {wanted!r}; columns are {', '.join(columns)}")
        return wanted
    found = find_column(columns, ("id", "class_id", "category_id", "label", "scientific_name", "class", "name"))
    if found is None:
        raise TaxoclipError(
            f"{origin}: cannot tell which column names the class; add a 'class_id' column or pass --class-column"
        )
    return found


def load_class_csv(path: Path, *, class_column: str | None = None) -> ClassTable:
    """A class table from a CSV with one row per class; ``class_column`` picks the id column."""
    columns, rows = read_csv_rows(path)
    rows = bioclip_style(columns, rows)
    columns = list(rows[0].keys()) if rows else columns
    key = class_key_column(columns, rows, class_column, path)
    records = [with_id(row, key) for row in rows]
    return ClassTable.from_records(records, origin=str(path))


def with_id(row: dict[str, str], key: str) -> dict[str, str]:
    """The row with ``id`` taken from the key column; the key column itself is kept as metadata
    unless it is just another spelling of ``id``."""
    record = {k: v for k, v in row.items() if k and COLUMN_ALIASES.get(k.strip().lower(), k.strip().lower()) != "id"}
    record["id"] = (row.get(key) or "").strip()
    return record


def load_image_csv(
    path: Path, *, root: Path | None = None, class_column: str | None = None, split: str | None = None
) -> Dataset:
    """One row per image: a path column, a class column, and the class's metadata repeated.

    Rows of one class must agree on its metadata; the first row that does not is named.
    """
    columns, rows = read_csv_rows(path)
    path_column = find_column(columns, PATH_COLUMNS)
    if path_column is None:
        return Dataset(load_class_csv(path, class_column=class_column), [], {"format": "csv", "path": str(path)})
    rows = bioclip_style(columns, rows)
    columns = list(rows[0].keys()) if rows else columns
    key = class_key_column(
        columns, rows, class_column or ("scientific_name" if "scientific_name" in columns else None), path
    )
    split_column = find_column(columns, SPLIT_COLUMNS)
    per_image = {path_column, split_column, "", None}
    image_root = root or path.parent
    classes: dict[str, dict[str, str]] = {}
    samples = []
    for line, row in enumerate(rows, start=2):
        class_id = (row.get(key) or "").strip()
        if not class_id:
            raise TaxoclipError(f"{path}, line {line}: empty {key!r}; every image needs a class")
        meta = with_id({k: v for k, v in row.items() if k not in per_image}, key)
        known = classes.setdefault(class_id, meta)
        for column, value in meta.items():
            if known.get(column, "") != value:
                raise TaxoclipError(
                    f"{path}, line {line}: class {class_id!r} has {column}={value!r} here but "
                    f"{known.get(column, '')!r} on an earlier row; a class's metadata must agree on every row"
                )
        row_split = normalise_split(row[split_column]) if split_column and row.get(split_column) else (split or "train")
        samples.append(Sample(str(image_root / row[path_column]), class_id, row_split))
    table = ClassTable.from_records(classes.values(), origin=str(path))
    return Dataset(table, samples, {"format": "csv", "path": str(path), "root": str(image_root)})
