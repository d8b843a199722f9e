"""Class re-balancing (``--balance N``): every class gets N images per epoch, over-sampled (repeated)
when it has fewer, under-sampled when it has more; and the alternative, class-weighted loss.

Two forms of the same sampler: exact when the training rows are known (cached embeddings or
activations), and by repeat factors when photos stream from shards (each photo of class c is used
floor(r_c) times plus once more with probability frac(r_c), r_c = N / n_c: N per class in
expectation, without random access to the photos).
"""

from __future__ import annotations

import numpy as np
import torch


def balanced_rows(rows: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` rows of every class present in ``rows`` (``labels`` aligned with them),
    shuffled. A class with n < N contributes all its rows N // n times plus N % n drawn without
    replacement (so no photo is repeated more than needed); one with n >= N, N drawn without
    replacement."""
    chosen = []
    # One stable sort puts each class's rows together in their original order (a mask per class
    # was a pass over every row per class: 10,000 passes over 2.7M rows for iNat2021).
    by_class = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[by_class], return_index=True)
    for start, end in zip(starts, [*starts[1:], len(by_class)], strict=True):
        mine = rows[by_class[start:end]]
        whole, rest = divmod(per_class, len(mine))
        chosen.append(np.tile(mine, whole))
        chosen.append(rng.choice(mine, size=rest, replace=False))
    order = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return rng.permutation(order)


def repeat_factors(images_per_class: np.ndarray, per_class: int) -> np.ndarray:
    """r_c = N / n_c (0 for a class with no training image)."""
    counts = np.asarray(images_per_class, dtype=np.float64)
    return np.divide(per_class, counts, out=np.zeros_like(counts), where=counts > 0)


def repeats(labels: torch.Tensor, factors: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """How many times each streamed photo is used: floor(r) + Bernoulli(frac(r))."""
    r = torch.as_tensor(factors, dtype=torch.float64)[labels]
    extra = torch.rand(len(labels), generator=generator, dtype=torch.float64) < (r - r.floor())
    return (r.floor() + extra).long()


def class_weights(images_per_class: np.ndarray) -> torch.Tensor:
    """Loss weights inversely proportional to each class's training images, scaled so the
    average photo weighs 1 (the loss stays on the unweighted scale); 0 for absent classes."""
    counts = np.asarray(images_per_class, dtype=np.float64)
    weights = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    weights *= counts.sum() / max(1e-12, float((weights * counts).sum()))
    return torch.tensor(weights, dtype=torch.float32)


def sampling_summary(images_per_class: np.ndarray, drawn_per_class: np.ndarray) -> dict:
    """What re-balancing did to an epoch: classes over- and under-sampled, and the spread."""
    present = images_per_class > 0
    have, drawn = images_per_class[present], drawn_per_class[present]
    return {
        "classes": int(present.sum()),
        "drawn_min": int(drawn.min()) if len(drawn) else 0,
        "drawn_max": int(drawn.max()) if len(drawn) else 0,
        "oversampled": int((drawn > have).sum()),
        "undersampled": int((drawn < have).sum()),
        "max_repeat": round(float((drawn / have).max()), 2) if len(drawn) else 0.0,
    }
