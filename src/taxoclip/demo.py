"""The demo: the whole path on real flower photos, each step's result written under one folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from taxoclip.captions import build_captions, write_caption_config, write_captions_csv
from taxoclip.data_paths import find_dataset
from taxoclip.shards import ShardOptions, verify_shards, write_shards
from taxoclip.sources import load_source
from taxoclip.taxonomy import Dataset

QUICK_CLASSES = 5


def keep_first_classes(dataset: Dataset, n: int) -> Dataset:
    ids = dataset.classes.ids[:n]
    chosen = set(ids)
    samples = [s for s in dataset.samples if s.class_id in chosen]
    return Dataset(dataset.classes.subset(ids), samples, dataset.source)


def run_demo(*, data: str | None = None, out: str | Path = "runs/demo", quick: bool = False) -> int:
    started = time.perf_counter()
    flowers = find_dataset("flowers102", data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"data": str(flowers)}

    print(f"[1/4] class metadata from {flowers}")
    dataset = load_source(flowers)
    if quick:
        dataset = keep_first_classes(dataset, QUICK_CLASSES)
    per_split = {split: sum(1 for s in dataset.samples if s.split == split) for split in dataset.splits}
    print(f"      {len(dataset.classes)} classes; images per split: {per_split}")
    dataset.classes.to_csv(out / "classes.csv")

    print("[2/4] captions")
    captions = build_captions(dataset.classes, "paper")
    write_captions_csv(dataset.classes, captions, out / "captions.csv")
    write_caption_config(captions, out / "captions.json")
    print(f"      auto would choose {captions.choice.describe()}")
    print(f"      using the paper's style, e.g. {captions.captions()[0]!r} ({captions.collisions()} shared)")

    print("[3/4] WebDataset shards")
    shard_dir = out / "shards"
    manifest = write_shards(dataset, shard_dir, captions, ShardOptions())
    totals = manifest["totals"]
    print(
        f"      input {totals['input']} = written {totals['written']} + rejected {totals['rejected']}; "
        f"{manifest['run']['images_per_second']} images/s"
    )

    print("[4/4] verify shards against the manifest")
    report = verify_shards(shard_dir)
    print(f"      {'OK' if report.ok else 'FAILED'}: {report.samples} samples in {report.shards} shards")
    for problem in report.problems[:10]:
        print(f"      problem: {problem}")

    summary.update(
        {
            "classes": len(dataset.classes),
            "images": per_split,
            "shards": totals,
            "verify_ok": report.ok,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"demo done in {summary['seconds']} s; results in {out}/ (summary.json, classes.csv, captions.csv, shards/)")
    return 0 if report.ok else 1
