"""Zero-shot with a pretrained open_clip model (e.g. BioCLIP, ``open_clip:hf-hub:imageomics/bioclip``)
over any class table: the same `Classifier` a trained model is."""

from __future__ import annotations

from pathlib import Path

import torch

from taxoclip.models.caption_embeddings import caption_sets, class_embeddings_cached
from taxoclip.models.classifier import EmbeddingClassifier
from taxoclip.models.towers import create_text_tower, fingerprint
from taxoclip.taxonomy import ClassTable


class OpenClipClassifier(EmbeddingClassifier):
    kind = "open_clip"

    def __init__(
        self,
        name: str,
        classes: ClassTable,
        by_class: list[dict[str, str]],
        style: str = "paper",
        *,
        pretrained: bool = True,
        cache_dir: Path | None = None,
    ):
        self.name, self.classes, self.training = name, classes, {}
        self.image_tower_name, self.image_pretrained = name, pretrained
        text = create_text_tower(name, pretrained=pretrained).eval()

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            return torch.cat([text.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)])

        cache_dir = cache_dir or Path.home() / ".cache" / "taxoclip"
        tag = f"{name}|pretrained={pretrained}|{fingerprint(text)}"
        self.class_embeddings = class_embeddings_cached(encode, caption_sets(by_class, classes, style), cache_dir, tag)
        logit_scale = getattr(text.model, "logit_scale", None)
        self.scale = float(logit_scale.detach().exp()) if logit_scale is not None else 100.0
