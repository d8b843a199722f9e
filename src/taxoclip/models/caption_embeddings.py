"""Class embeddings from captions: one caption style or a CLIP-style template ensemble per class,
encoded once and kept on disk keyed by the captions and the encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from taxoclip.errors import TaxoclipError


def caption_sets(by_class: list[dict[str, str]], classes, style: str) -> list[list[str]]:
    """Per class, the captions whose embeddings are averaged: one caption of a style, or the
    CLIP-style template ensemble (``style="templates"``)."""
    from taxoclip.data.captions import template_captions

    if style == "templates":
        return [template_captions(row) for row in classes]
    if style not in by_class[0]:
        raise TaxoclipError(f"unknown caption style {style!r}; use templates or one of {', '.join(by_class[0])}")
    return [[entry[style]] for entry in by_class]


def class_embeddings_cached(encode, sets: list[list[str]], cache_dir: Path, tag: str) -> torch.Tensor:
    """Mean normalised embedding of each class's captions, stored as ``cache_dir/class_embeddings-*.npy``
    keyed by the captions and the encoder ``tag``, so a second evaluation does not encode 10,000
    captions again."""
    digest = hashlib.sha256(json.dumps([tag, sets]).encode()).hexdigest()[:16]
    path = cache_dir / f"class_embeddings-{digest}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    flat = [caption for captions in sets for caption in captions]
    encoded = torch.nn.functional.normalize(encode(flat).float(), dim=-1)
    sizes = torch.tensor([len(s) for s in sets])
    owner = torch.repeat_interleave(torch.arange(len(sets)), sizes)
    sums = torch.zeros(len(sets), encoded.shape[1]).index_add_(0, owner, encoded)
    embeddings = torch.nn.functional.normalize(sums, dim=-1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, embeddings.numpy())
    return embeddings
