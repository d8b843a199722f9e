"""LiT training speed on real flowers, side by side in one run:

- cached embeddings vs ``--image-in-loop`` (the image tower runs every step, as OpenCLIP's
  --lock-image does): same text tower, data and batch size (512), seconds per step and per epoch;
- the same for a ViT-B/16 image tower (open_clip, random weights), from its measured forward speed;
- a whole LiT training run vs the one feature-extraction pass it replaces.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import benchmark
from taxoclip.data.captions import build_captions
from taxoclip.data.paths import find_dataset
from taxoclip.data.shards import ShardOptions, write_shards
from taxoclip.data.sources import load_source
from taxoclip.models.extraction import extract_features
from taxoclip.models.towers import create_image_tower
from taxoclip.train.lit import LiTSettings, train_lit
from taxoclip.train.log import load_history

BATCH = 512
STEPS = 4  # steps timed in each mode (a whole in-loop epoch takes minutes here)


def seconds_per_step(config: LiTSettings) -> float:
    train_lit(config)
    history = load_history(config.output)
    return history[-1]["seconds"] / STEPS


@benchmark("lit")
def bench_lit(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = load_source(find_dataset("flowers102"))
        write_shards(dataset, tmp / "shards", build_captions(dataset.classes, "paper"), ShardOptions(progress=False))
        started = time.perf_counter()
        cache = extract_features(tmp / "shards", "efficientnet-lite0", tmp / "features", progress=False)
        extraction = time.perf_counter() - started
        n_train = int(cache.split_mask("train").sum())
        steps_per_epoch = n_train // BATCH

        common = dict(
            features=str(tmp / "features"), batch_size=BATCH, epochs=1, progress=False, max_steps_per_epoch=STEPS
        )
        cached = seconds_per_step(LiTSettings(output=str(tmp / "cached"), **common))
        in_loop = seconds_per_step(
            LiTSettings(output=str(tmp / "loop"), image_in_loop=True, shards=str(tmp / "shards"), **common)
        )
        rows.append(
            {
                "what": "LiT step, cached embeddings (lite0 + minilm-l6, batch 512)",
                "s/step": cached,
                "s/epoch": cached * steps_per_epoch,
            }
        )
        rows.append(
            {
                "what": "LiT step, image tower in the loop (same model, data, batch)",
                "s/step": in_loop,
                "s/epoch": in_loop * steps_per_epoch,
            }
        )
        rows.append({"what": "speed-up of the cache, efficientnet-lite0 (aim >= 20x)", "ratio": in_loop / cached})

        # A bigger image tower: the in-loop step pays B forward passes of it; the cached step does not.
        vit = create_image_tower("open_clip:ViT-B-16", pretrained=False).for_inference(torch.device("cpu"))
        pixels = torch.randint(0, 255, (32, 3, 224, 224), dtype=torch.uint8)
        vit.embed(pixels[:8])
        started = time.perf_counter()
        vit.embed(pixels)
        vit_rate = len(pixels) / (time.perf_counter() - started)
        vit_step = BATCH / vit_rate + cached
        rows.append(
            {
                "what": f"ViT-B/16 forward ({vit_rate:.1f} images/s): in-loop step from it",
                "s/step": vit_step,
                "s/epoch": vit_step * steps_per_epoch,
            }
        )
        rows.append({"what": "speed-up of the cache, ViT-B/16", "ratio": vit_step / cached})

        started = time.perf_counter()
        train_lit(LiTSettings(features=str(tmp / "features"), output=str(tmp / "full"), progress=False))
        training = time.perf_counter() - started
        final = load_history(tmp / "full")[-1]
        rows.append({"what": "feature extraction, train + valid (one pass)", "seconds": extraction})
        rows.append(
            {"what": f"LiT training, default 10 epochs (valid top-1 {100 * final['top1']:.1f}%)", "seconds": training}
        )
        rows.append({"what": "LiT training / extraction (aim <= 0.5)", "ratio": training / extraction})
    return rows
