"""The LiT model: a locked image tower (represented by its cached embeddings) and a trainable text
tower projected into the same space, with a learnable temperature.

Image side: ``(features - mean)`` then, optionally, a linear map. Centring by the training-set
mean is fixed (computed once from the cache): CNN features are all positive, and cosine
similarity between uncentred ones is dominated by their common direction.
Text side: the text tower (only its top layers train, the rest is cached per caption) and a
linear projection, which can start from a ridge-regression fit of the pretrained caption
embeddings onto class-mean image embeddings, so training starts from a working classifier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taxoclip.models.losses import class_contrastive_loss, clip_loss, unique_targets
from taxoclip.models.towers import TextTower


@dataclass
class LiTConfig:
    """Everything that defines a LiT model's shape (saved with it)."""

    image_tower: str
    text_tower: str
    image_width: int
    text_width: int
    embed_dim: int  # the shared space (the image width when there is no image projection)
    image_pretrained: bool = True  # False: the tower's architecture with (seeded) random weights
    image_projection: bool = False
    text_layers: int | None = 2  # top text blocks that train; None: all
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)

    def to_json(self) -> dict:
        return asdict(self)


class LiTModel(nn.Module):
    def __init__(self, config: LiTConfig, text_tower: TextTower, image_mean: np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.text_tower = text_tower
        self.text_tower.set_trainable(config.text_layers)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        mean = (
            torch.zeros(config.image_width) if image_mean is None else torch.as_tensor(image_mean, dtype=torch.float32)
        )
        self.register_buffer("image_mean", mean)
        self.image_projection = (
            nn.Linear(config.image_width, config.embed_dim, bias=False) if config.image_projection else None
        )
        if self.image_projection is not None:
            nn.init.orthogonal_(self.image_projection.weight)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))

    # --- embeddings -----------------------------------------------------------------------------

    def encode_image_features(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float() - self.image_mean
        if self.image_projection is not None:
            x = self.image_projection(x)
        return F.normalize(x, dim=-1)

    def encode_text_prefix(self, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_tower.from_prefix(prefix)), dim=-1)

    @torch.no_grad()
    def encode_captions(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised embeddings of any captions (evaluation: no dropout, no gradients)."""
        was_training = self.training
        self.eval()
        device = self.logit_scale.device
        outputs = []
        for start in range(0, len(captions), batch_size):
            tokens = {
                k: v.to(device) for k, v in self.text_tower.tokenize(captions[start : start + batch_size]).items()
            }
            outputs.append(F.normalize(self.text_projection(self.text_tower(tokens)), dim=-1))
        self.train(was_training)
        return torch.cat(outputs) if outputs else torch.zeros(0, self.config.embed_dim)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()

    # --- training -------------------------------------------------------------------------------

    def forward(
        self,
        image_features: torch.Tensor,
        labels: torch.Tensor,
        captions: CaptionBank,
        style_of_class: torch.Tensor,
        loss: str = "class",
        gather=None,
    ) -> torch.Tensor:
        """The loss of one batch. ``style_of_class[c]`` is the caption style used for class c in
        this step; ``gather`` (distributed) joins image embeddings and labels of all ranks."""
        image = self.encode_image_features(image_features)
        if gather is not None:
            image, labels = gather(image, labels)
        if loss == "class":
            classes, targets = unique_targets(labels)
            text = self.encode_text_prefix(captions.select(classes, style_of_class[classes]))
            return class_contrastive_loss(image, text, targets, self.scale())
        if loss == "clip":
            text = self.encode_text_prefix(captions.select(labels, style_of_class[labels]))
            return clip_loss(image, text, self.scale())
        raise ValueError(f"unknown loss {loss!r}")


class CaptionBank:
    """Every class's caption in every training style, tokenised, with the frozen part of the text
    tower already applied (computed once: captions never change during training)."""

    def __init__(
        self, text_tower: TextTower, captions_by_style: list[list[str]], device: torch.device, batch_size: int = 256
    ):
        self.n_styles, self.n_classes = len(captions_by_style), len(captions_by_style[0])
        flat = [caption for style in captions_by_style for caption in style]
        tokens = {k: v.to(device) for k, v in text_tower.tokenize(flat).items()}
        parts = [
            text_tower.prefix({k: v[i : i + batch_size] for k, v in tokens.items()})
            for i in range(0, len(flat), batch_size)
        ]
        self.prefix = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def select(self, classes: torch.Tensor, styles: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prefix rows of these (class, style) captions, trimmed to their longest caption."""
        rows = (styles * self.n_classes + classes).to(next(iter(self.prefix.values())).device)
        chosen = {k: v[rows] for k, v in self.prefix.items()}
        mask = chosen.get("attention_mask")
        if mask is not None:
            length = int(mask.sum(1).max())
            chosen = {k: v[:, :length] for k, v in chosen.items()}
        return chosen


@torch.no_grad()
def ridge_text_projection(
    model: LiTModel, captions: list[str], class_means: torch.Tensor, has_class: torch.Tensor, ridge: float = 1e-2
) -> None:
    """Start the text projection as the ridge fit of pretrained caption embeddings onto the
    (centred, normalised) class-mean image embeddings of the classes with training images."""
    text = model.text_tower.eval()
    device = model.logit_scale.device
    tokens = {k: v.to(device) for k, v in text.tokenize(captions).items()}
    t = text(tokens)[has_class]
    target = F.normalize(class_means[has_class], dim=-1)
    if model.image_projection is not None:
        target = F.normalize(model.image_projection(target), dim=-1)
    gram = t.T @ t + ridge * len(t) * torch.eye(t.shape[1], device=device)
    weight = torch.linalg.solve(gram, t.T @ target)  # (text_width, embed_dim)
    model.text_projection.weight.copy_(weight.T)
    text.train()
