"""Evaluation at iNat2021 scale: a 10,000-class zero-shot classifier from the real categories'
captions (MiniLM-L6 + a LiT projection into a 1,280-wide image space), then 100,000 image
embeddings scored against it in chunks, with every metric at every rank."""

from __future__ import annotations

import resource
import time

import torch

from common import benchmark
from taxoclip.data.captions import build_captions
from taxoclip.data.paths import find_dataset
from taxoclip.data.sources import load_source
from taxoclip.eval.metrics import Evaluation
from taxoclip.models.lit import LiTConfig, LiTModel
from taxoclip.models.towers import create_text_tower

IMAGES, WIDTH, CHUNK = 100_000, 1280, 4096


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@benchmark("eval")
def bench_eval(args) -> list[dict]:
    dataset = load_source(find_dataset("inat2021") / "categories.json")
    captions = build_captions(dataset.classes, "paper").captions()
    text = create_text_tower("minilm-l6")
    model = LiTModel(
        LiTConfig(
            image_tower="efficientnet-lite0",
            text_tower="minilm-l6",
            image_width=WIDTH,
            text_width=text.width,
            embed_dim=WIDTH,
        ),
        text,
    ).eval()
    memory_before = peak_memory_mb()
    started = time.perf_counter()
    class_embeddings = model.encode_captions(captions)
    encode_seconds = time.perf_counter() - started

    # Image embeddings near their class's caption, so the metrics are not all zero; timing is the point.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(captions), (IMAGES,), generator=generator)
    evaluation = Evaluation(dataset.classes, group_by=["supercategory"])
    started = time.perf_counter()
    for start in range(0, IMAGES, CHUNK):
        chunk_labels = labels[start : start + CHUNK]
        noise = torch.randn(len(chunk_labels), WIDTH, generator=generator) * 0.03
        image = torch.nn.functional.normalize(class_embeddings[chunk_labels] + noise, dim=-1)
        logits = model.scale().detach() * image @ class_embeddings.T
        evaluation.add(logits.softmax(-1), chunk_labels)
    result = evaluation.result()
    score_seconds = time.perf_counter() - started
    return [
        {
            "what": f"encode {len(captions):,} captions once (minilm-l6, CPU)",
            "seconds": encode_seconds,
            "per second": len(captions) / encode_seconds,
        },
        {
            "what": f"score {IMAGES:,} embeddings x {len(captions):,} classes, all ranks, chunks of {CHUNK}",
            "seconds": score_seconds,
            "per second": IMAGES / score_seconds,
        },
        {
            "what": f"peak memory of the process (MB); a full probability matrix would be "
            f"{IMAGES * len(captions) * 4 / 1e9:.0f} GB",
            "seconds": None,
            "per second": None,
            "MB": max(peak_memory_mb(), memory_before),
        },
        {
            "what": "sanity: top-1 on the synthetic embeddings",
            "top1": result["top1"],
            "genus": result["per_rank"]["genus"]["rollup"],
        },
    ]
