import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from conftest import write_image
from taxoclip.apps.cli import main
from taxoclip.data.captions import build_captions
from taxoclip.data.shards import ShardOptions, read_manifest, verify_shards, write_shards
from taxoclip.data.sources import load_source


def shard(source, out, **options):
    dataset = load_source(source)
    captions = build_captions(dataset.classes, "paper")
    return write_shards(dataset, out, captions, ShardOptions(progress=False, **options))


def test_round_trip_through_webdataset(image_folder, tmp_path):
    manifest = shard(image_folder, tmp_path / "s", max_count=6, workers=2)
    assert manifest["totals"] == {"input": 28, "written": 28, "rejected": 0, "reject_reasons": {}}
    assert manifest["splits"]["train"]["count"] == 20 and manifest["splits"]["valid"]["count"] == 8
    assert all(s["count"] <= 6 for s in manifest["shards"])
    assert verify_shards(tmp_path / "s", decode=True, progress=False).ok

    # The shards are plain WebDataset: the library's own reader sees every field.
    urls = [str(tmp_path / "s" / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 28
    sample = samples[0]
    meta = sample["json"]
    assert sample["jpg"].size == (40, 32)
    assert (
        sample["txt"]
        == meta["captions"]["paper"]
        == f"A photo of the {meta['class']['common_name']} {meta['class']['scientific_name']}"
    )
    assert int(sample["cls"]) == meta["class_index"]


def test_original_bytes_are_stored(image_folder, tmp_path):
    manifest = shard(image_folder, tmp_path / "s")
    with tarfile.open(tmp_path / "s" / manifest["shards"][0]["name"]) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
    key = next(n for n in members if n.endswith(".jpg")).removesuffix(".jpg")
    meta = json.loads(members[f"{key}.json"])
    assert members[f"{key}.jpg"] == Path(meta["path"]).read_bytes()


def test_same_seed_same_bytes_other_seed_other_order(image_folder, tmp_path):
    a = shard(image_folder, tmp_path / "a", seed=3)
    b = shard(image_folder, tmp_path / "b", seed=3)
    c = shard(image_folder, tmp_path / "c", seed=4)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]


def test_bad_files_are_skipped_listed_and_counted(image_folder, tmp_path):
    train = image_folder / "train"
    (train / "1" / "empty.jpg").write_bytes(b"")
    good = (train / "1" / "img_0.jpg").read_bytes()
    (train / "2" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (train / "3" / "notes.txt").write_text("not a photo")
    (train / "10" / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    manifest = shard(image_folder, tmp_path / "s")
    totals = manifest["totals"]
    assert totals["input"] == 32 and totals["written"] == 28 and totals["rejected"] == 4
    reasons = {Path(r["path"]).name: r["reason"] for r in manifest["rejects"]}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.txt"] == "not an image"
    assert reasons["truncated.jpg"].startswith("corrupt or truncated")
    assert "fake.jpg" in reasons
    assert verify_shards(tmp_path / "s", progress=False).ok


def test_shards_by_bytes_and_resize(image_folder, tmp_path):
    manifest = shard(image_folder, tmp_path / "s", max_bytes=20_000, max_count=1000)
    assert len(manifest["shards"]) > 2
    assert all(s["bytes"] <= 20_000 + 10_240 for s in manifest["shards"])  # + tar's end-of-archive padding
    resized = shard(image_folder, tmp_path / "r", resize=16)
    sample = next(
        iter(wds.WebDataset([str(tmp_path / "r" / resized["shards"][0]["name"])], shardshuffle=False).decode("pil"))
    )
    assert min(sample["jpg"].size) == 16


def test_verify_finds_damage(image_folder, tmp_path):
    manifest = shard(image_folder, tmp_path / "s")
    path = tmp_path / "s" / manifest["shards"][0]["name"]
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_shards(tmp_path / "s", progress=False)
    assert not report.ok and "checksum" in report.problems[0]
    assert main(["shards", "verify", str(tmp_path / "s"), "-q"]) == 1


def test_other_inputs_into_same_folder_needs_overwrite(image_folder, tmp_path, capsys):
    shard(image_folder, tmp_path / "s", seed=1)
    code = main(["shards", str(image_folder), "-o", str(tmp_path / "s"), "--seed", "2", "-q"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["shards", str(image_folder), "-o", str(tmp_path / "s"), "--seed", "2", "-q", "--overwrite"]) == 0
    assert read_manifest(tmp_path / "s")["options"]["seed"] == 2
    assert verify_shards(tmp_path / "s", progress=False).ok


def test_killed_and_rerun_finishes_without_duplicates(tmp_path):
    root = tmp_path / "many"
    for n in range(400):
        write_image(root / f"c{n % 4}" / f"{n}.jpg", n, size=(200, 160))
    out = tmp_path / "s"
    command = [
        sys.executable,
        "-m",
        "taxoclip",
        "shards",
        str(root),
        "-o",
        str(out),
        "--shard-size",
        "4",
        "--workers",
        "1",
        "-q",
    ]
    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.tar")) and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("*.tar")))
    assert not (out / "manifest.json").exists(), "the run finished before it could be interrupted"
    assert 0 < done_before < 100
    # Whatever was in flight is a .tmp file, never a complete-looking .tar without its record.
    assert all((out / (p.stem + ".json")).exists() for p in out.glob("*.tar"))

    assert subprocess.run(command).returncode == 0
    manifest = read_manifest(out)
    assert manifest["run"]["shards_resumed"] >= done_before
    assert manifest["totals"]["written"] == 400 and manifest["totals"]["rejected"] == 0
    assert not list(out.glob("*.tmp"))
    report = verify_shards(out, progress=False)
    assert report.ok and report.samples == 400  # verify also fails on any duplicate key


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "taxoclip", "shards", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such file or folder" in result.stderr


@pytest.mark.slow
def test_real_flowers_train_split(flowers, tmp_path):
    assert main(["shards", str(flowers), "--split", "train", "-o", str(tmp_path / "s"), "-q"]) == 0
    manifest = read_manifest(tmp_path / "s")
    assert manifest["totals"]["written"] == 6552 and manifest["totals"]["rejected"] == 0
    assert manifest["splits"]["train"]["classes"] == 102
    assert main(["shards", "verify", str(tmp_path / "s"), "-q"]) == 0


def test_shard_workers_are_fresh_processes_not_forks_of_the_planner(image_folder, tmp_path, monkeypatch):
    """At iNat2021's size the planner holds millions of Python objects; a forked worker shares
    them copy-on-write and its garbage collector copies them (2 GB over three processes at 1M
    photos). Workers from a fork server do not see the planner's memory at all: here, a change
    made to the planner's module after start-up does not reach them."""
    import taxoclip.data.shards as shards_module

    def broken(path):
        raise OSError(5, "seen only by forked workers")

    monkeypatch.setattr(shards_module, "read_photo", broken)
    manifest = shard(image_folder, tmp_path / "s", workers=2)
    assert manifest["totals"]["rejected"] == 0
    assert manifest["totals"]["written"] == manifest["totals"]["input"]
