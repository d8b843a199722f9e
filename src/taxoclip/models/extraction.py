"""Feature extraction: one pass of an image tower over the data into a feature cache (the cache's
format, its reading and the photo loader live in `taxoclip.data.features`; this module runs the
model). Work is done in units (one shard, or 1,000 images of a source); each finished unit is saved
under ``parts/``, so a killed run resumes where it stopped. Under ``torchrun`` each rank takes every
world_size-th unit and rank 0 merges the parts (a filesystem shared by the ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from taxoclip.data.device_decode import choose_decode
from taxoclip.data.features import (
    CACHE_VERSION,
    CacheWriter,
    DataPlan,
    FeatureCache,
    Unit,
    batch_on_device,
    image_loader,
    load_features,
    plan_data,
    recorded_cache_key,
)
from taxoclip.errors import TaxoclipError
from taxoclip.models.towers import ImageTower, create_image_tower
from taxoclip.output_lock import locks_output
from taxoclip.runtime import setup


def cache_key(tower: ImageTower, plan: DataPlan) -> str:
    payload = {"tower": tower.describe(), "data": plan.data_id, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@locks_output("out")
def extract_features(
    data: str | Path,
    tower: str | ImageTower,
    out: str | Path,
    *,
    split: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str | None = None,
    decode: str = "auto",
    pretrained: bool = True,
    progress: bool = True,
    **source_options,
) -> FeatureCache:
    """Embed every image of ``data`` (a shard folder or any source) with ``tower`` into ``out``.

    ``decode``: where JPEGs are decoded, "workers" (CPU processes), "device" (batched on the
    tower's device: nvJPEG on a GPU) or "auto" (the device when it is a GPU whose decoder works).
    Returns the cache; a second call with the same inputs returns it without running the tower.
    """
    out = Path(out)
    plan = plan_data(data, split, **source_options)
    tower = tower if isinstance(tower, ImageTower) else create_image_tower(tower, pretrained=pretrained)
    key = cache_key(tower, plan)
    runtime = setup(device)
    existing = out / "meta.json"
    if existing.exists():
        found = recorded_cache_key(existing)
        if found == key:
            return load_features(out)
        if runtime.is_main:
            if found is None:  # said even when quiet: something was wrong with the folder
                print(f"note: {existing} is damaged: computing the features again", file=sys.stderr)
            elif progress:
                print(f"{out}: cached features are for other inputs or another tower; computing them again")
            for name in ("meta.json", "features.npy", "labels.npy", "splits.npy", "keys.json"):
                (out / name).unlink(missing_ok=True)
        runtime.barrier()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # Each rank takes every world_size-th unit; finished units (an earlier, killed run) are skipped.
    mine = [u for u in runtime.share(plan.units) if not part_done(parts, u, key)]
    decode = choose_decode(decode, runtime.device)
    run_units(
        mine,
        tower,
        parts,
        key,
        batch_size=batch_size,
        workers=workers,
        device=runtime.device,
        progress=progress and runtime.is_main,
        decode=decode,
    )
    shares = runtime.gather_objects({"rank": runtime.rank, "units": [u.name for u in mine], "decode": decode})
    if runtime.is_main:
        merge_parts(plan, tower, key, out, seconds=time.perf_counter() - started, shares=shares)
    runtime.barrier()
    cache = load_features(out)
    cache.computed_now = True
    return cache


def part_done(parts: Path, unit: Unit, key: str) -> bool:
    record = parts / f"{unit.name}.json"
    if not record.exists() or not (parts / f"{unit.name}.npy").exists():
        return False
    try:
        return json.loads(record.read_text()).get("cache_key") == key
    except json.JSONDecodeError:
        return False


@torch.no_grad()
def run_units(
    units: list[Unit],
    tower: ImageTower,
    parts: Path,
    key: str,
    *,
    batch_size: int,
    workers: int | None,
    device: torch.device,
    progress: bool,
    decode: str = "workers",
) -> None:
    if not units:
        return
    tower = tower.for_inference(device)
    loader = image_loader(units, tower.preprocess, batch_size, device, workers, decode=decode)
    expected = {u.name: u.count for u in units}
    buffers: dict[str, dict[str, list]] = {
        u.name: {"features": [], "keys": [], "labels": [], "splits": [], "rejects": [], "seen": 0} for u in units
    }
    bar = tqdm(total=sum(expected.values()), unit="img", desc="features", disable=not progress, smoothing=0.05)
    for batch in loader:
        pixels, good, bad = batch_on_device(batch, tower.preprocess, device)
        if pixels is not None:
            embeddings = tower.embed(pixels).cpu().numpy().astype(np.float16)
            for item, embedding in zip(good, embeddings, strict=True):
                buffer = buffers[item["unit"]]
                buffer["features"].append(embedding)
                buffer["keys"].append(item["key"])
                buffer["labels"].append(item["label"])
                buffer["splits"].append(item["split"])
        for item in bad:
            buffers[item["unit"]]["rejects"].append({"key": item["key"], "reason": item["reason"]})
        touched = {i["unit"] for i in good + bad}
        for name in touched:
            buffer = buffers[name]
            if buffer:
                buffer["seen"] = len(buffer["keys"]) + len(buffer["rejects"])
            if not buffer or buffer["seen"] > expected[name]:
                raise TaxoclipError(
                    f"{name}: holds more samples than its manifest lists; run 'taxoclip shards verify' on the shards"
                )
            if buffer["seen"] == expected[name]:
                save_part(parts, name, buffer, key, tower.width)
                buffers[name] = {}
        bar.update(len(good) + len(bad))
    bar.close()
    unfinished = [n for n, b in buffers.items() if b]
    if unfinished:
        raise TaxoclipError(
            f"units {', '.join(unfinished)} yielded fewer images than their manifest says; "
            "run 'taxoclip shards verify' on the shards"
        )


def save_part(parts: Path, name: str, buffer: dict, key: str, width: int) -> None:
    features = np.stack(buffer["features"]) if buffer["features"] else np.zeros((0, width), np.float16)
    temporary = parts / f"{name}.tmp.npy"
    np.save(temporary, features)
    os.replace(temporary, parts / f"{name}.npy")
    record = {
        "cache_key": key,
        "keys": buffer["keys"],
        "labels": buffer["labels"],
        "splits": buffer["splits"],
        "rejects": buffer["rejects"],
    }
    (parts / f"{name}.json.tmp").write_text(json.dumps(record))
    os.replace(parts / f"{name}.json.tmp", parts / f"{name}.json")  # the record last: it marks the part done


def merge_parts(
    plan: DataPlan, tower: ImageTower, key: str, out: Path, *, seconds: float, shares: list[dict] | None = None
) -> None:
    # One part's record in memory at a time (each holds its rows' keys): the row count comes from
    # the parts' array headers, so merging a million rows holds one unit, not every record.
    total = sum(np.load(out / "parts" / f"{u.name}.npy", mmap_mode="r").shape[0] for u in plan.units)
    writer = CacheWriter(out, total, tower.width)
    rejects = list(plan.rejects)
    for unit in plan.units:
        record = json.loads((out / "parts" / f"{unit.name}.json").read_text())
        part = np.load(out / "parts" / f"{unit.name}.npy")
        writer.add(part, record["labels"], record["splits"], record["keys"])
        rejects += record["rejects"]
    writer.finish(
        {
            "cache_key": key,
            "tower": tower.describe(),
            "data": plan.description | {"data_id": plan.data_id},
            "rejected": len(rejects),
            "rejects": rejects,
            "classes": plan.classes,
            "captions": plan.captions,
            "seconds": round(seconds, 2),
            # Which process embedded which units in this run (units done by an earlier run are absent).
            "ranks": shares or [{"rank": 0, "units": [u.name for u in plan.units]}],
        }
    )
    shutil.rmtree(out / "parts", ignore_errors=True)


# --- synthetic caches: the real format at any size, for benchmarks and tests ---------------------
