"""Shard writing on the real flowers train split: images/s, against just reading the same files."""

from __future__ import annotations

import os
import tempfile
import time

from common import benchmark
from taxoclip.data.captions import build_captions
from taxoclip.data.paths import find_dataset
from taxoclip.data.shards import ShardOptions, write_shards
from taxoclip.data.sources import load_source


def read_all(paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            handle.read()
    return time.perf_counter() - started


@benchmark("shards")
def bench_shards(args) -> list[dict]:
    dataset = load_source(find_dataset("flowers102"), split="train")
    captions = build_captions(dataset.classes, "paper")
    n = len(dataset.samples)
    read_seconds = read_all([s.path for s in dataset.samples])  # also warms the page cache for both runs
    rows = [
        {"what": "read the files only (1 process)", "images": n, "seconds": read_seconds, "images/s": n / read_seconds}
    ]
    for workers in (1, os.cpu_count() or 1):
        with tempfile.TemporaryDirectory() as out:
            options = ShardOptions(workers=workers, progress=False)
            started = time.perf_counter()
            manifest = write_shards(dataset, out, captions, options)
            seconds = time.perf_counter() - started
        assert manifest["totals"]["written"] == n
        rows.append(
            {
                "what": f"taxoclip shards, {workers} worker(s), full decode check",
                "images": n,
                "seconds": seconds,
                "images/s": n / seconds,
            }
        )
    return rows
