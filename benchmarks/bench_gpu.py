"""GPU speed (skipped without CUDA): feature extraction vs the bare forward pass, with JPEGs decoded
by CPU workers and by nvJPEG on the GPU (and how close their embeddings are), and LiT steps with
cached embeddings vs the image tower in the loop, for EfficientNet-Lite0 and ViT-B/16.

Speed depends on architecture, not weights, so this runs on synthetic photos (JPEGs of the
flowers' size) and same-architecture towers with random weights: it needs no data or hub. The
text tower is $TAXOCLIP_TEXT_TOWER (default minilm-l6).
"""

from __future__ import annotations

import csv
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from common import benchmark
from taxoclip.data.captions import build_captions
from taxoclip.data.shards import ShardOptions, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.models.towers import create_image_tower
from taxoclip.train.lit import LiTSettings, train_lit
from taxoclip.train.log import load_history

CLASSES, TRAIN_PER_CLASS, VALID_PER_CLASS = 102, 240, 8  # ~25,000 photos: start-up costs amortise
BATCH, STEPS = 512, 4
TOWERS = {"efficientnet-lite0": "timm:tf_efficientnet_lite0", "ViT-B/16": "timm:vit_base_patch16_224"}


def synthetic_photos(root: Path) -> None:
    """Smooth colour fields with texture, 256 x 320 JPEG at quality 90 (decode cost of real photos)."""
    rng = random.Random(0)
    for c in range(CLASSES):
        base = [rng.randrange(256) for _ in range(3)]
        for split, n in (("train", TRAIN_PER_CLASS), ("valid", VALID_PER_CLASS)):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = Image.new("RGB", (16, 20))
                small.putdata([tuple(max(0, min(255, b + rng.randint(-60, 60))) for b in base) for _ in range(320)])
                image = small.resize((256, 320), Image.Resampling.BICUBIC).filter(ImageFilter.DETAIL)
                image.save(folder / f"{i}.jpg", quality=90)
    with open(root / "classes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "common_name", "family", "genus", "specific_epithet"])
        for c in range(CLASSES):
            writer.writerow([c, f"flower number {c}", f"Family{c % 40}", f"Genus{c}", f"epithet{c}"])


def lowest_cosine(caches: dict) -> float:
    """How far the GPU-decoded embeddings are from the CPU-decoded ones, photo for photo (1.0:
    the same to rounding)."""
    workers, device = caches["workers"], caches["device"]
    row = workers.row_of()
    a = np.asarray(device.features, np.float32)
    b = np.asarray(workers.features[[row[key] for key in device.keys]], np.float32)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def seconds_per_step(config: LiTSettings) -> float:
    train_lit(config)
    return load_history(config.output)[-1]["seconds"] / STEPS


@benchmark("gpu")
def bench_gpu(args) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"what": "skipped: no CUDA device here"}]
    text_tower = os.environ.get("TAXOCLIP_TEXT_TOWER", "minilm-l6")
    rows = [{"what": f"device: {torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, text tower {text_tower}"}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_photos(tmp / "photos")
        dataset = load_source(tmp / "photos")
        started = time.perf_counter()
        # Shards of 500: decode workers each take whole shards, so more shards keep all of them busy.
        write_shards(
            dataset, tmp / "shards", build_captions(dataset.classes), ShardOptions(max_count=500, progress=False)
        )
        rows.append({"what": "shards (CPU)", "images/s": len(dataset.samples) / (time.perf_counter() - started)})
        warmed = False
        for label, name in TOWERS.items():
            tower = create_image_tower(name, pretrained=False)
            caches = {
                decode: extract_features(
                    tmp / "shards",
                    tower,
                    tmp / (f"features-{label[:3]}" + ("" if decode == "workers" else "-on-device")),
                    batch_size=256,
                    progress=False,
                    device="cuda",
                    decode=decode,
                )
                for decode in ("workers", "device")
            }
            cache = caches["workers"]
            n = cache.meta["count"]
            gpu_tower = tower.for_inference(torch.device("cuda"))
            pixels = torch.randint(
                0, 255, (256, 3, tower.preprocess.size, tower.preprocess.size), dtype=torch.uint8, device="cuda"
            )
            gpu_tower.embed(pixels)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(8):
                gpu_tower.embed(pixels)
            torch.cuda.synchronize()
            bare_rate = 8 * 256 / (time.perf_counter() - started)
            rows.append({"what": f"{label}: bare forward on the GPU (bf16, batch 256)", "images/s": bare_rate})
            for decode, where in (("workers", "decode in CPU workers"), ("device", "nvJPEG decode on the GPU")):
                rate = n / caches[decode].meta["seconds"]
                rows.append({"what": f"{label}: features pipeline, {where}", "images/s": rate})
                rows.append({"what": f"{label}: pipeline ({decode}) / bare (aim >= 0.7)", "ratio": rate / bare_rate})
            rows.append({"what": f"{label}: nvJPEG vs CPU decode, lowest cosine", "ratio": lowest_cosine(caches)})

            common = dict(
                features=str(cache.path),
                text_tower=text_tower,
                batch_size=BATCH,
                epochs=1,
                progress=False,
                max_steps_per_epoch=STEPS,
                device="cuda",
            )
            if not warmed:  # CUDA, cuBLAS and the text tower's first steps, outside the timings
                train_lit(LiTSettings(output=str(tmp / "warm-up"), **common))
                warmed = True
            cached = seconds_per_step(LiTSettings(output=str(tmp / f"c-{label[:3]}"), **common))
            in_loop = seconds_per_step(
                LiTSettings(
                    output=str(tmp / f"l-{label[:3]}"), image_in_loop=True, shards=str(tmp / "shards"), **common
                )
            )
            rows.append({"what": f"{label}: LiT step, cached embeddings", "s/step": cached})
            rows.append({"what": f"{label}: LiT step, image tower in the loop", "s/step": in_loop})
            rows.append({"what": f"{label}: speed-up of the cache", "ratio": in_loop / cached})
        started = time.perf_counter()
        train_lit(
            LiTSettings(
                features=str(tmp / "features-eff"),
                output=str(tmp / "full"),
                text_tower=text_tower,
                epochs=10,
                progress=False,
                device="cuda",
            )
        )
        rows.append(
            {
                "what": f"LiT training, 10 epochs of {CLASSES * TRAIN_PER_CLASS:,} photos (cached, lite0)",
                "seconds": time.perf_counter() - started,
            }
        )
    return rows
