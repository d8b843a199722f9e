"""An image folder, ``root/<class>/*`` or ``root/<split>/<class>/*``, plus a CSV of class metadata."""

from __future__ import annotations

import os
from pathlib import Path

from taxoclip.data.sources.tables import load_class_csv
from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import KNOWN_SPLITS, ClassTable, Dataset, Sample, natural_key, normalise_split


def visible_dirs(path: Path) -> list[Path]:
    return sorted(
        (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
    )


def class_folders(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """Map split -> [(class folder name, folder)]; a root without split folders is one split, 'train'."""
    top = visible_dirs(root)
    if not top:
        raise TaxoclipError(
            f"{root}: no class folders found; expected {root}/<class>/<image> or {root}/<split>/<class>/<image>"
        )
    split_dirs = [d for d in top if normalise_split(d.name) in KNOWN_SPLITS]
    if split_dirs and len(split_dirs) == len(top):
        return {normalise_split(d.name): [(c.name, c) for c in visible_dirs(d)] for d in split_dirs}
    return {"train": [(d.name, d) for d in top]}


def folder_files(folder: Path) -> list[Path]:
    """Every visible regular file below a class folder; bad ones are rejected later, with a reason."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(found, key=lambda p: natural_key(str(p)))


def find_classes_csv(root: Path) -> Path | None:
    preferred = root / "classes.csv"
    if preferred.exists():
        return preferred
    csvs = sorted(root.glob("*.csv"))
    return csvs[0] if len(csvs) == 1 else None


def table_from_folder_names(names: list[str]) -> ClassTable:
    """No metadata: each folder name is the class; a "Genus_species" name is taken as a binomial."""
    records = []
    for name in sorted(names, key=natural_key):
        text = name.replace("_", " ").strip()
        words = text.split()
        looks_binomial = len(words) == 2 and words[0][:1].isupper() and words[1].islower()
        records.append({"id": name, ("scientific_name" if looks_binomial else "common_name"): text})
    return ClassTable.from_records(records, origin="folder names")


def load_folder(root: Path, *, classes_csv: Path | None = None, class_column: str | None = None) -> Dataset:
    layout = class_folders(root)
    csv_path = classes_csv or find_classes_csv(root)
    names = sorted({name for folders in layout.values() for name, _ in folders}, key=natural_key)
    if csv_path is not None:
        table = load_class_csv(csv_path, class_column=class_column)
        # Keep the CSV's classes in natural id order so indices are stable whatever the row order.
        table = table.subset(sorted(table.ids, key=natural_key))
    else:
        table = table_from_folder_names(names)
    samples = [
        Sample(str(path), name, split)
        for split, folders in layout.items()
        for name, folder in folders
        for path in folder_files(folder)
    ]
    source = {"format": "folder", "path": str(root)}
    if csv_path is not None:
        source["classes"] = str(csv_path)
    dataset = Dataset(table, samples, source)
    dataset.check_sample_classes()
    return dataset
