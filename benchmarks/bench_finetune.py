"""Fine-tuning speed on real flowers, side by side in one run (EfficientNet-Lite0, batch 64):
seconds per optimiser step, and per epoch of the 6,552 training photos, for

- the head alone on cached embeddings (--depth head);
- the last stage + head on cached activations of the frozen stages below (--depth upper);
- the same last stage + head with the frozen lower stages run on the photos every step (what the
  activation cache saves; photo decoding, which this path would also pay, is not counted);
- the whole tower + head (--depth full; decoding not counted either).

Steps are interleaved round by round and the median taken (the machine is shared and noisy).
"""

from __future__ import annotations

import numpy as np
import torch

from bench_catlip import CACHE, flowers_cache
from common import benchmark, interleaved_step_seconds
from taxoclip.models.extraction import extract_features
from taxoclip.models.finetune import FinetuneHead
from taxoclip.models.split import split_tower
from taxoclip.models.towers import create_image_tower
from taxoclip.train.depths import TowerOnPixels
from taxoclip.train.finetune import FinetuneStep

BATCH, STEPS = 64, 4


@benchmark("finetune")
def bench_finetune(args) -> list[dict]:
    cache = flowers_cache()
    classes = len(cache.classes)
    train_photos = int(cache.split_mask("train").sum())
    tower = create_image_tower("efficientnet-lite0")
    lower, upper = split_tower(tower, 1)
    activations = extract_features(CACHE / "flowers-shards", lower, CACHE / "flowers-lite0-lower", progress=False)
    rng = np.random.default_rng(0)
    embeddings_x, labels_y = cache.split("train")
    activations_x, _ = activations.split("train")
    rows = rng.choice(len(labels_y), BATCH, replace=False)
    labels = torch.from_numpy(labels_y[rows].astype(np.int64))
    embeddings = torch.from_numpy(embeddings_x[rows])
    cached_activations = torch.from_numpy(np.asarray(activations_x[rows]))
    size = tower.preprocess.size
    pixels = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8)

    def head() -> FinetuneHead:
        return FinetuneHead(tower.width, classes)

    head_only = FinetuneStep(head(), None, classes)
    on_cache = FinetuneStep(head(), upper, classes)
    whole = FinetuneStep(head(), TowerOnPixels(create_image_tower("efficientnet-lite0")), classes)

    def frozen_lower_every_step(inputs, targets):
        with torch.no_grad():
            below = lower.embed(inputs).clone()  # out of inference mode, so autograd may use it
        return on_cache(below, targets)

    runs = {
        "head on cached embeddings": (lambda: head_only(embeddings, labels), list(head_only.parameters())),
        "last stage + head on cached activations": (
            lambda: on_cache(cached_activations, labels),
            list(on_cache.parameters()),
        ),
        "last stage + head, frozen stages run every step": (
            lambda: frozen_lower_every_step(pixels, labels),
            list(on_cache.parameters()),
        ),
        "whole tower + head": (lambda: whole(pixels, labels), list(whole.parameters())),
    }
    for module in (head_only, on_cache, whole):
        module.train()
    median = interleaved_step_seconds(runs, STEPS)
    steps_per_epoch = train_photos // BATCH
    out = [
        {"what": f"{name} (batch {BATCH})", "seconds": seconds, "epoch_s": seconds * steps_per_epoch}
        for name, seconds in median.items()
    ]
    cached = median["last stage + head on cached activations"]
    out.append(
        {
            "what": "speed-up of cached activations over running the frozen stages every step",
            "ratio": median["last stage + head, frozen stages run every step"] / cached,
        }
    )
    out.append(
        {"what": "speed-up of cached activations over the whole tower", "ratio": median["whole tower + head"] / cached}
    )
    out.append(
        {
            "what": "speed-up of the head on cached embeddings over cached activations",
            "ratio": cached / median["head on cached embeddings"],
        }
    )
    return out
