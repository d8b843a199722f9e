"""iNaturalist 2017/2018/2021 metadata: COCO-style JSON, or a bare list of categories."""

from __future__ import annotations

import json
from pathlib import Path

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable, Dataset, Sample, natural_key, normalise_split

# The official 2021 fields; 2017 has only id/name/supercategory, 2018 lacks the common name.
INAT_FIELDS = (
    "kingdom",
    "phylum",
    "class",
    "order",
    "family",
    "genus",
    "specific_epithet",
    "common_name",
    "supercategory",
    "image_dir_name",
)


def read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise TaxoclipError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}); is it an iNaturalist file?"
        ) from None


def categories_table(categories: list[dict], origin: str) -> ClassTable:
    records = []
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise TaxoclipError(f"{origin}: category {position} lacks 'id' or 'name'; iNaturalist categories need both")
        record = {"id": str(category["id"]), "scientific_name": category["name"]}
        record.update({f: category.get(f, "") for f in INAT_FIELDS})
        records.append(record)
    records.sort(key=lambda r: natural_key(r["id"]))
    return ClassTable.from_records(records, origin=origin)


def split_from_filename(path: Path) -> str:
    stem = path.stem.lower()
    for word in ("val", "test", "train"):
        if word in stem:
            return normalise_split(word)
    return "train"


def load_inat(path: Path, *, root: Path | None = None, split: str | None = None) -> Dataset:
    """One COCO-style file (images + annotations + categories) or a bare categories list.

    A directory holding ``train.json`` / ``val.json`` (the competition layout) loads both,
    with image paths relative to ``root`` (default: that directory).
    """
    if path.is_dir():
        files = [p for p in (path / "train.json", path / "val.json") if p.exists()]
        if not files:
            raise TaxoclipError(f"{path}: no train.json or val.json here")
        parts = [load_inat(f, root=root or path) for f in files]
        classes = parts[0].classes
        for other in parts[1:]:
            if other.classes.ids != classes.ids:
                raise TaxoclipError(f"{path}: train.json and val.json list different categories")
        samples = [s for part in parts for s in part.samples]
        return Dataset(classes, samples, {"format": "inat", "path": str(path)})

    data = read_json(path)
    origin = str(path)
    if isinstance(data, list):
        return Dataset(categories_table(data, origin), [], {"format": "inat", "path": origin})
    if not isinstance(data, dict) or "categories" not in data:
        raise TaxoclipError(f"{path}: expected a COCO-style object with 'categories' (or a list of categories)")
    classes = categories_table(data["categories"], origin)
    image_root = root or path.parent
    split_name = normalise_split(split) if split else split_from_filename(path)
    files = {}
    for image in data.get("images", []):
        try:
            files[image["id"]] = image["file_name"]
        except (KeyError, TypeError):
            raise TaxoclipError(f"{path}: an entry of 'images' lacks 'id' or 'file_name'") from None
    samples = []
    for annotation in data.get("annotations", []):
        image_id = annotation.get("image_id")
        if image_id not in files:
            raise TaxoclipError(f"{path}: annotation refers to image id {image_id!r}, which 'images' does not list")
        samples.append(Sample(str(image_root / files[image_id]), str(annotation["category_id"]), split_name))
    return Dataset(classes, samples, {"format": "inat", "path": origin, "root": str(image_root)})
