"""Feature extraction on real flower photos: the whole pipeline (read shards, decode in workers,
preprocess, forward) against the bare forward pass on the same, already decoded images; and the
same pipeline with `--decode device` (on CPU: decoded in the main process, for comparison)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import benchmark
from taxoclip.data.captions import build_captions
from taxoclip.data.images import decode_image
from taxoclip.data.paths import find_dataset
from taxoclip.data.shards import ShardOptions, iter_tar_samples, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.models.towers import create_image_tower

BATCH = 64


def bare_forward_seconds(tower, pixels: torch.Tensor) -> float:
    tower.embed(pixels[:BATCH])  # warm-up, as the pipeline's first batch also pays it
    started = time.perf_counter()
    for start in range(0, len(pixels), BATCH):
        tower.embed(pixels[start : start + BATCH])
    return time.perf_counter() - started


@benchmark("features")
def bench_features(args) -> list[dict]:
    torch.manual_seed(0)
    dataset = load_source(find_dataset("flowers102"), split="valid")
    tower = create_image_tower("efficientnet-lite0").for_inference(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(dataset, shards, build_captions(dataset.classes), ShardOptions(progress=False))
        pixels = torch.stack(
            [
                tower.preprocess.to_uint8(decode_image(s["jpg"]))
                for tar in sorted(shards.glob("*.tar"))
                for s in iter_tar_samples(tar)
            ]
        )
        n = len(pixels)
        # Alternate the two measurements so drifting load on this shared machine hits both alike.
        pipeline, on_device, bare = [], [], []
        for round_ in range(3):
            cache = extract_features(shards, tower, Path(tmp) / f"f{round_}", batch_size=BATCH, progress=False)
            pipeline.append(cache.meta["seconds"])
            cache = extract_features(
                shards, tower, Path(tmp) / f"d{round_}", batch_size=BATCH, progress=False, decode="device"
            )
            on_device.append(cache.meta["seconds"])
            bare.append(bare_forward_seconds(tower, pixels))
        pipeline_s, device_s, bare_s = min(pipeline), min(on_device), min(bare)
    rows.append(
        {
            "what": "bare forward, pre-decoded (efficientnet-lite0)",
            "images": n,
            "seconds": bare_s,
            "images/s": n / bare_s,
        }
    )
    rows.append(
        {
            "what": "taxoclip features: shards -> decode -> forward -> cache",
            "images": n,
            "seconds": pipeline_s,
            "images/s": n / pipeline_s,
        }
    )
    rows.append({"what": "ratio pipeline / bare (aim >= 0.9)", "images": n, "ratio": (n / pipeline_s) / (n / bare_s)})
    rows.append(
        {
            "what": "the pipeline with --decode device (CPU: decoded in the main process)",
            "images": n,
            "seconds": device_s,
            "images/s": n / device_s,
        }
    )
    rows.append({"what": "ratio --decode device / workers on CPU", "images": n, "ratio": pipeline_s / device_s})
    return rows
