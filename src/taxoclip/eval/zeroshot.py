"""Zero-shot accuracy: top-k of image embeddings against class embeddings, in bounded chunks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, : min(k, k_max)].any(1).sum()) for k in ks}


def accuracy(
    scores: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    classes: np.ndarray | None = None,
    chunk: int = 4096,
) -> dict[str, float]:
    """Top-1/top-5 of ``scores(inputs)`` (logits over all classes), scored in chunks so memory
    stays bounded for many images and classes. ``classes`` restricts the candidates (e.g. only
    the held-out classes); labels are class indices."""
    position = None
    if classes is not None:
        candidates = torch.as_tensor(classes, dtype=torch.long)
        position = torch.full((int(max(candidates.max(), labels.max() if len(labels) else 0)) + 1,), -1)
        position[candidates] = torch.arange(len(candidates))
        labels = position[labels]
    totals = {1: 0, 5: 0}
    for start in range(0, len(inputs), chunk):
        logits = scores(inputs[start : start + chunk])
        if classes is not None:
            logits = logits[:, candidates]
        for k, n in topk_correct(logits, labels[start : start + chunk]).items():
            totals[k] += n
    count = max(1, len(inputs))
    return {"top1": totals[1] / count, "top5": totals[5] / count, "count": len(inputs)}


def seen_unseen_accuracy(
    scores: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor, held_out: np.ndarray
) -> dict[str, float]:
    """Top-1/top-5 over all classes; with held-out classes, also the seen classes' top-1 and the
    held-out classes' top-1 among themselves (the unseen-species figure)."""
    result = {k: v for k, v in accuracy(scores, inputs, labels).items() if k != "count"}
    if len(held_out):
        unseen = torch.from_numpy(np.isin(labels.numpy(), held_out))
        seen = accuracy(scores, inputs[~unseen], labels[~unseen])
        among = accuracy(scores, inputs[unseen], labels[unseen], classes=held_out)
        result.update({"seen_top1": seen["top1"], "unseen_top1": among["top1"], "unseen_count": among["count"]})
    return result
