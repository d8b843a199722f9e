"""Load class metadata and images from any supported source, detecting the format from the path.

Formats:
  inat    iNaturalist 2017/2018/2021 COCO-style JSON, a bare categories list, or a folder with
          train.json / val.json
  cub     CUB-200-2011's folder (images.txt, classes.txt, image_class_labels.txt, ...)
  folder  root/<class>/<image> or root/<split>/<class>/<image>, with a classes CSV (optional)
  csv     a CSV: one row per class (metadata only) or one row per image (with a path column)
"""

from __future__ import annotations

from pathlib import Path

from taxoclip.data.sources.cub import load_cub
from taxoclip.data.sources.folder import load_folder
from taxoclip.data.sources.inat import load_inat
from taxoclip.data.sources.tables import load_class_csv, load_image_csv
from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import Dataset

FORMATS = ("inat", "cub", "folder", "csv")


def detect_format(path: Path) -> str:
    if not path.exists():
        raise TaxoclipError(f"{path}: no such file or folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "inat"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise TaxoclipError(
            f"{path}: cannot tell the format from a '{suffix}' file; pass --format ({', '.join(FORMATS)})"
        )
    if (path / "images.txt").exists() and (path / "classes.txt").exists():
        return "cub"
    if (path / "train.json").exists() or (path / "val.json").exists():
        return "inat"
    return "folder"


def load_source(
    path: str | Path,
    *,
    format: str | None = None,
    root: str | Path | None = None,
    classes: str | Path | None = None,
    class_column: str | None = None,
    split: str | None = None,
) -> Dataset:
    """Read a source into a `Dataset` (class table + samples).

    ``root`` resolves image paths of JSON/CSV sources; ``classes`` is a class CSV for an image
    folder (or to replace a source's own class table); ``split`` keeps one split only.
    """
    path = Path(path)
    kind = format or detect_format(path)
    if not path.exists():
        raise TaxoclipError(f"{path}: no such file or folder")
    root_path = Path(root) if root else None
    if kind == "inat":
        dataset = load_inat(path, root=root_path)
    elif kind == "cub":
        dataset = load_cub(path)
    elif kind == "folder":
        if not path.is_dir():
            raise TaxoclipError(f"{path}: the folder format needs a directory of class folders")
        dataset = load_folder(path, classes_csv=Path(classes) if classes else None, class_column=class_column)
    elif kind == "csv":
        dataset = load_image_csv(path, root=root_path, class_column=class_column)
    else:
        raise TaxoclipError(f"unknown format {kind!r}; use one of {', '.join(FORMATS)}")
    if classes and kind != "folder":
        table = load_class_csv(Path(classes), class_column=class_column)
        dataset = Dataset(table, dataset.samples, {**dataset.source, "classes": str(classes)})
    dataset.check_sample_classes()
    return dataset.only_split(split)


__all__ = ["FORMATS", "detect_format", "load_source"]
