"""CUB-200-2011: the dataset's own text files, plus its class-level attributes when present."""

from __future__ import annotations

from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Sample

CUB_FILES = ("images.txt", "classes.txt", "image_class_labels.txt")
TOP_ATTRIBUTES = 5  # attributes per class kept for captions; more makes captions too long to help


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Lines of "<number> <text>" (CUB's format); names the file and line on a bad line."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise TaxoclipError(f"{path}, line {number}: expected '<id> <value>', got {line.strip()!r}")
            pairs.append((parts[0], parts[1].strip()))
    return pairs


def common_name_of(folder: str) -> str:
    """ "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    return folder.split(".", 1)[-1].replace("_", " ")


def attribute_phrase(name: str) -> str:
    """ "has_wing_color::brown" -> "brown wing color"."""
    part, _, value = name.partition("::")
    part = part.removeprefix("has_").replace("_", " ")
    return f"{value.replace('_', ' ')} {part}".strip()


def class_attributes(root: Path, n_classes: int) -> list[str] | None:
    names_file = next(
        (
            p
            for p in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt")
            if p.exists()
        ),
        None,
    )
    values_file = root / "attributes" / "class_attribute_labels_continuous.txt"
    if names_file is None or not values_file.exists():
        return None
    names = [attribute_phrase(name) for _, name in read_pairs(names_file)]
    rows = [line.split() for line in values_file.read_text().splitlines() if line.strip()]
    if len(rows) != n_classes or any(len(r) != len(names) for r in rows):
        raise TaxoclipError(
            f"{values_file}: expected {n_classes} rows of {len(names)} values (one per class and attribute)"
        )
    phrases = []
    for row in rows:
        scores = sorted(((float(v), i) for i, v in enumerate(row)), key=lambda t: (-t[0], t[1]))
        phrases.append(", ".join(names[i] for _, i in scores[:TOP_ATTRIBUTES]))
    return phrases


def load_cub(root: Path) -> Dataset:
    missing = [name for name in CUB_FILES if not (root / name).exists()]
    if missing:
        raise TaxoclipError(f"{root}: not a CUB-200-2011 folder, missing {', '.join(missing)}")
    classes = read_pairs(root / "classes.txt")
    attributes = class_attributes(root, len(classes))
    records = []
    for position, (class_id, folder) in enumerate(classes):
        record = {"id": class_id, "common_name": common_name_of(folder), "folder": folder}
        if attributes:
            record["attributes"] = attributes[position]
        records.append(record)
    table = ClassTable.from_records(records, origin=str(root / "classes.txt"))

    images = dict(read_pairs(root / "images.txt"))
    labels = dict(read_pairs(root / "image_class_labels.txt"))
    split_file = root / "train_test_split.txt"
    is_train = dict(read_pairs(split_file)) if split_file.exists() else {}
    samples = []
    for image_id, relative in images.items():
        if image_id not in labels:
            raise TaxoclipError(f"{root / 'image_class_labels.txt'}: image {image_id} ({relative}) has no class label")
        split = "train" if is_train.get(image_id, "1") == "1" else "test"
        samples.append(Sample(str(root / "images" / relative), labels[image_id], split))
    return Dataset(table, samples, {"format": "cub", "path": str(root), "classes": str(root / "classes.txt")})
