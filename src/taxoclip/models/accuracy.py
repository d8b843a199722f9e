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


class SeenUnseenAccuracy:
    """`seen_unseen_accuracy` accumulated chunk by chunk (``add(logits, labels)``), so a trainer
    scores a valid split of any size streamed from the cache, never holding it whole."""

    def __init__(self, held_out: np.ndarray):
        self.held_out = torch.as_tensor(np.asarray(held_out), dtype=torch.long)
        self.counts = {"all": [0, 0, 0], "seen": [0, 0, 0], "unseen": [0, 0, 0]}  # top-1 hits, top-5 hits, rows

    def _count(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if len(labels):
            hits = topk_correct(logits, labels)
            total = self.counts[name]
            total[0], total[1], total[2] = total[0] + hits[1], total[1] + hits[5], total[2] + len(labels)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.cpu()
        logits = logits.cpu()
        self._count("all", logits, labels)
        if len(self.held_out):
            unseen = torch.isin(labels, self.held_out)
            self._count("seen", logits[~unseen], labels[~unseen])
            position = torch.full((logits.shape[1],), -1, dtype=torch.long)
            position[self.held_out] = torch.arange(len(self.held_out))
            self._count("unseen", logits[unseen][:, self.held_out], position[labels[unseen]])

    @property
    def count(self) -> int:
        """Rows added so far."""
        return self.counts["all"][2]

    def result(self) -> dict[str, float]:
        def share(name: str, which: int) -> float:
            return self.counts[name][which] / max(1, self.counts[name][2])

        result = {"top1": share("all", 0), "top5": share("all", 1)}
        if len(self.held_out):
            result |= {"seen_top1": share("seen", 0), "unseen_top1": share("unseen", 0)}
            result["unseen_count"] = self.counts["unseen"][2]
        return result


def seen_unseen_accuracy(
    scores: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    held_out: np.ndarray,
    chunk: int = 4096,
) -> dict[str, float]:
    """Top-1/top-5 over all classes; with held-out classes, also the seen classes' top-1 and the
    held-out classes' top-1 among themselves (the unseen-species figure)."""
    total = SeenUnseenAccuracy(held_out)
    for start in range(0, len(inputs), chunk):
        total.add(scores(inputs[start : start + chunk]), labels[start : start + chunk])
    return total.result()
