import json
import os
import subprocess

import numpy as np
import pytest

import taxoclip.models.extraction as extraction_module
from conftest import torchrun
from taxoclip.data.captions import build_captions
from taxoclip.data.features import load_features
from taxoclip.data.images import decode_image
from taxoclip.data.shards import ShardOptions, iter_tar_samples, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.models.towers import create_image_tower

TOWER = "timm:test_efficientnet"


@pytest.fixture
def shards(image_folder, tmp_path):
    dataset = load_source(image_folder)
    write_shards(
        dataset, tmp_path / "shards", build_captions(dataset.classes), ShardOptions(max_count=5, progress=False)
    )
    return tmp_path / "shards"


@pytest.fixture(scope="module")
def tower():
    return create_image_tower(TOWER, pretrained=False)


def extract(data, out, tower, **kwargs):
    return extract_features(data, tower, out, workers=0, progress=False, batch_size=4, **kwargs)


def test_cache_contents_match_the_shards(shards, tmp_path, tower):
    cache = extract(shards, tmp_path / "f", tower)
    assert cache.computed_now
    assert cache.features.shape == (28, tower.width) and cache.features.dtype == np.float16
    assert isinstance(cache.features, np.memmap)
    assert cache.meta["split_counts"] == {"train": 20, "valid": 8} and cache.meta["rejected"] == 0
    assert len(set(cache.keys)) == 28
    x, y = cache.split("valid")
    assert x.shape == (8, tower.width) and x.dtype == np.float32 and sorted(set(y.tolist())) == [0, 1, 2, 3]
    assert cache.classes.ids == ["1", "2", "3", "10"]
    # Each row is the tower's embedding of that sample's image.

    sample = next(iter_tar_samples(sorted(shards.glob("*.tar"))[0]))
    pixels = tower.preprocess.to_uint8(decode_image(sample["jpg"]))[None]
    row = cache.row_of()[sample["__key__"].decode()]
    expected = tower.embed(pixels)[0].numpy()
    assert np.allclose(cache.features[row].astype(np.float32), expected, atol=2e-2 * np.abs(expected).max())
    assert cache.labels[row] == int(sample["cls"])


def test_second_run_is_served_from_cache_and_changed_input_is_not(shards, tmp_path, tower, image_folder):
    first = extract(shards, tmp_path / "f", tower)
    again = extract(shards, tmp_path / "f", tower)
    assert not again.computed_now and np.array_equal(np.asarray(again.features), np.asarray(first.features))
    other_tower = create_image_tower("timm:test_resnet", pretrained=False)
    changed = extract(shards, tmp_path / "f", other_tower)
    assert changed.computed_now and changed.features.shape[1] == other_tower.width
    # Changed data: a new photo in the source means other shards, so other features.
    from conftest import write_image

    write_image(image_folder / "train" / "1" / "new.jpg", 999)
    dataset = load_source(image_folder)
    write_shards(
        dataset, shards, build_captions(dataset.classes), ShardOptions(max_count=5, progress=False), overwrite=True
    )
    refreshed = extract(shards, tmp_path / "f", other_tower)
    assert refreshed.computed_now and refreshed.features.shape[0] == 29


def test_interrupted_run_resumes_and_matches_a_clean_run(shards, tmp_path, tower, monkeypatch):
    clean = extract(shards, tmp_path / "clean", tower)
    saved = []
    original = extraction_module.save_part

    def save_then_stop(parts, name, *args):
        original(parts, name, *args)
        saved.append(name)
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if killed after two finished units

    monkeypatch.setattr(extraction_module, "save_part", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        extract(shards, tmp_path / "f", tower)
    assert not (tmp_path / "f" / "meta.json").exists()

    saved.clear()
    monkeypatch.setattr(extraction_module, "save_part", lambda *a: (saved.append(a[1]), original(*a)))
    resumed = extract(shards, tmp_path / "f", tower)
    assert len(saved) == len(list(shards.glob("*.tar"))) - 2  # only the unfinished units ran
    assert resumed.keys == clean.keys
    assert np.array_equal(np.asarray(resumed.features), np.asarray(clean.features))
    assert not (tmp_path / "f" / "parts").exists()


def test_from_a_source_folder_with_a_corrupt_photo(image_folder, tmp_path, tower):
    (image_folder / "valid" / "2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    cache = extract(image_folder, tmp_path / "f", tower)
    assert cache.meta["data"]["kind"] == "source"
    assert cache.meta["count"] == 28 and cache.meta["rejected"] == 1
    assert "cannot decode" in cache.meta["rejects"][0]["reason"]
    assert cache.meta["captions"]["by_class"][0]["paper"].startswith("A photo of the pink primrose")


def test_loading_a_folder_that_is_not_a_cache_is_a_clear_error(tmp_path):
    from taxoclip import TaxoclipError

    with pytest.raises(TaxoclipError, match="not a feature cache"):
        load_features(tmp_path)


def test_two_processes_under_torchrun_match_one(shards, tmp_path):
    single = extract_features(shards, TOWER, tmp_path / "one", pretrained=False, workers=0, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = torchrun(
        "features",
        str(shards),
        "--tower",
        TOWER,
        "--random-weights",
        "-o",
        str(tmp_path / "two"),
        "--workers",
        "0",
        "-q",
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    double = load_features(tmp_path / "two")
    assert double.keys == single.keys and np.array_equal(double.labels, single.labels)
    assert np.allclose(np.asarray(double.features, np.float32), np.asarray(single.features, np.float32), atol=1e-2)
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["cache_key"] == single.meta["cache_key"]
    # One process group of two: each rank embedded its own half of the units, none twice.
    shares = double.meta["ranks"]
    units = [u.removesuffix(".tar") for u in sorted(p.name for p in shards.glob("*.tar"))]
    assert [share["rank"] for share in shares] == [0, 1]
    assert all(share["units"] for share in shares)
    assert sorted(shares[0]["units"] + shares[1]["units"]) == units
    assert not set(shares[0]["units"]) & set(shares[1]["units"])
    assert single.meta["ranks"] == [{"rank": 0, "units": units, "decode": "workers"}]


@pytest.mark.slow
def test_real_flowers_features_with_efficientnet_lite0(flowers, tmp_path):
    """A few real classes through the real pretrained tower: same-class photos are nearest."""
    from taxoclip.apps.demo import keep_first_classes

    dataset = keep_first_classes(load_source(flowers, split="valid"), 4)
    write_shards(dataset, tmp_path / "s", build_captions(dataset.classes), ShardOptions(progress=False))
    cache = extract_features(tmp_path / "s", "efficientnet-lite0", tmp_path / "f", progress=False)
    x, y = cache.split("valid")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -1)
    assert (y[similarity.argmax(1)] == y).mean() >= 0.8
