"""Fixtures the tests make themselves: tiny images, class tables, and each source layout."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from taxoclip.data_paths import optional_dataset


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(20):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.putpixel((x, y), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, size))
    return path


TINY_CLASSES = [
    # id, common name, family, genus, epithet
    ("1", "pink primrose", "Onagraceae", "Oenothera", "speciosa"),
    ("2", "sweet pea", "Fabaceae", "Lathyrus", "odoratus"),
    ("3", "garden pea", "Fabaceae", "Lathyrus", "sativus"),
    ("10", "sunflower", "Asteraceae", "Helianthus", "annuus"),
]


def write_classes_csv(path: Path, classes=TINY_CLASSES) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["class_id", "common_name", "kingdom", "family", "genus", "specific_epithet", "scientific_name"]
        )
        for class_id, common, family, genus, epithet in classes:
            writer.writerow([class_id, common, "Plantae", family, genus, epithet, f"{genus} {epithet}"])
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/{train,valid}/<class>/*.jpg with classes.csv: 4 classes, 5 + 2 images each."""
    root = tmp_path / "flowers"
    seed = 0
    for class_id, *_ in TINY_CLASSES:
        for split, n in (("train", 5), ("valid", 2)):
            for i in range(n):
                seed += 1
                write_image(root / split / class_id / f"img_{i}.jpg", seed)
    write_classes_csv(root / "classes.csv")
    return root


@pytest.fixture
def inat_json(tmp_path: Path) -> Path:
    """A COCO-style iNat 2021 train file with 3 categories and 6 images."""
    categories = []
    for i, (_, common, family, genus, epithet) in enumerate(TINY_CLASSES[:3]):
        categories.append(
            {
                "id": i,
                "name": f"{genus} {epithet}",
                "common_name": common,
                "supercategory": "Plants",
                "kingdom": "Plantae",
                "phylum": "Tracheophyta",
                "class": "Magnoliopsida",
                "order": "Fabales",
                "family": family,
                "genus": genus,
                "specific_epithet": epithet,
                "image_dir_name": f"{i:05d}_{genus}_{epithet}",
            }
        )
    images, annotations = [], []
    for n in range(6):
        category = categories[n % 3]
        name = f"train/{category['image_dir_name']}/{n}.jpg"
        write_image(tmp_path / name, n)
        images.append({"id": 100 + n, "file_name": name, "width": 40, "height": 32})
        annotations.append({"id": n, "image_id": 100 + n, "category_id": category["id"]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="session")
def flowers() -> Path:
    path = optional_dataset("flowers102")
    if path is None:
        pytest.skip("real data ../shared/data/flowers102 is absent (set TAXOCLIP_DATA to its parent folder)")
    return path


@pytest.fixture(scope="session")
def inat2021_categories() -> Path:
    path = optional_dataset("inat2021")
    if path is None:
        pytest.skip("real data ../shared/data/inat2021 is absent (set TAXOCLIP_DATA to its parent folder)")
    return path / "categories.json"
