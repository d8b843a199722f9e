"""Zero-shot classification: class embeddings from captions, scores against image embeddings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from taxoclip.models.towers import fingerprint


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


# --- classifiers ----------------------------------------------------------------------------------


def caption_sets(by_class: list[dict[str, str]], classes, style: str) -> list[list[str]]:
    """Per class, the captions whose embeddings are averaged: one caption of a style, or the
    CLIP-style template ensemble (``style="templates"``)."""
    from taxoclip.data.captions import template_captions

    if style == "templates":
        return [template_captions(row) for row in classes]
    if style not in by_class[0]:
        from taxoclip.errors import TaxoclipError

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


class OpenClipZeroShot:
    """Zero-shot with a pretrained open_clip model (e.g. BioCLIP) and any class table, with the
    same interface the evaluation uses for a trained model."""

    def __init__(
        self,
        name: str,
        classes,
        by_class: list[dict[str, str]],
        style: str,
        *,
        pretrained: bool = True,
        cache_dir: Path | None = None,
    ):
        from taxoclip.models.towers import create_text_tower

        self.name, self.classes = name, classes
        self.image_tower_name, self.image_pretrained = name, pretrained
        text = create_text_tower(name, pretrained=pretrained).eval()

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            return torch.cat([text.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)])

        cache_dir = cache_dir or Path.home() / ".cache" / "taxoclip"
        tag = f"{name}|pretrained={pretrained}|{fingerprint(text)}"
        self.class_embeddings = class_embeddings_cached(encode, caption_sets(by_class, classes, style), cache_dir, tag)
        self.scale = float(text.model.logit_scale.detach().exp()) if hasattr(text.model, "logit_scale") else 100.0

    def image_embeddings(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, np.float32)), dim=-1)

    def logits_from_features(self, features) -> torch.Tensor:
        return self.scale * self.image_embeddings(features) @ self.class_embeddings.T
