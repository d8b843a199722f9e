"""Which cached rows a trainer learns from and scores on, and which classes it never sees."""

from __future__ import annotations

import numpy as np

from taxoclip.data.features import FeatureCache
from taxoclip.errors import TaxoclipError


def held_out_classes(n_classes: int, holdout: int, seed: int) -> np.ndarray:
    """``holdout`` class indices, drawn by ``seed``, kept out of training (``--holdout``)."""
    if holdout <= 0:
        return np.zeros(0, dtype=np.int64)
    if holdout >= n_classes:
        raise TaxoclipError(f"--holdout {holdout} leaves no class to train on ({n_classes} classes)")
    return np.sort(np.random.default_rng(seed).choice(n_classes, size=holdout, replace=False))


def split_rows(cache: FeatureCache, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training rows without the held-out classes, every valid row)."""
    train = np.flatnonzero(cache.split_mask("train") & ~np.isin(cache.labels, held_out))
    valid = np.flatnonzero(cache.split_mask("valid")) if "valid" in cache.split_names else np.zeros(0, np.int64)
    check_finite(cache, np.concatenate([train, valid]))
    return train, valid


def check_finite(cache: FeatureCache, rows: np.ndarray) -> None:
    """Refuse NaN or infinite embeddings (a damaged cache) before they train into NaN weights."""
    bad: list[int] = []
    for part, features in cache.chunks(rows):
        bad.extend(part[~np.isfinite(features).all(axis=1)].tolist())
    if bad:
        keys = ", ".join(cache.keys[row] for row in bad[:5])
        raise TaxoclipError(
            f"{cache.path / 'features.npy'}: {len(bad)} rows hold NaN or infinite values (samples {keys}"
            f"{' ...' if len(bad) > 5 else ''}); the cache is damaged: delete the folder and run 'taxoclip features'"
        )
