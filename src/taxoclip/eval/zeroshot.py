"""Zero-shot accuracy: top-k of image embeddings against class embeddings, in bounded chunks."""

from __future__ import annotations

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, : min(k, k_max)].any(1).sum()) for k in ks}


def zero_shot_accuracy(
    image: torch.Tensor,
    class_embeddings: torch.Tensor,
    labels: torch.Tensor,
    classes: np.ndarray | None = None,
    chunk: int = 4096,
) -> dict[str, float]:
    """Top-1/top-5 of normalised image embeddings against normalised class embeddings.

    ``classes`` restricts the candidates (e.g. only the held-out classes); labels are class indices.
    Scoring goes in chunks so memory stays bounded for many images and classes.
    """
    if classes is not None:
        candidates = torch.as_tensor(classes, dtype=torch.long)
        class_embeddings = class_embeddings[candidates]
        position = torch.full((int(candidates.max()) + 1,), -1, dtype=torch.long)
        position[candidates] = torch.arange(len(candidates))
        labels = position[labels]
    totals = {1: 0, 5: 0}
    for start in range(0, len(image), chunk):
        logits = image[start : start + chunk] @ class_embeddings.T
        for k, n in topk_correct(logits, labels[start : start + chunk]).items():
            totals[k] += n
    count = max(1, len(image))
    return {"top1": totals[1] / count, "top5": totals[5] / count, "count": len(image)}
