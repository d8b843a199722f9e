"""What every model kind offers once loaded: a `Classifier` from photos (or cached image-tower
features) to probabilities over its class table. predict, eval, serve and export use only this,
so they never ask which kind of model they hold.

A kind implements `head()` (features -> logits, a torch module, which is also what ONNX exports)
and says which image tower it needs. Models that score in a shared image-text space (LiT,
open_clip) derive from `EmbeddingClassifier`, which also gives the evaluation's baselines the
image embeddings, class embeddings and temperature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taxoclip.errors import TaxoclipError
from taxoclip.taxonomy import ClassTable


class Classifier:
    kind: str = ""  # "lit", "open_clip", ... (the registry's name for it)
    name: str = ""  # what it was loaded from: a folder or an open_clip: name
    classes: ClassTable
    image_tower_name: str = ""
    image_pretrained: bool = True
    image_tower_id: str | None = None  # the exact tower (weights included) its features must come from
    training: dict  # what the model recorded of its training ({} when it has no record)

    _tower: Any = None

    def head(self) -> nn.Module:
        """Image-tower features (N, width) -> class logits (N, classes)."""
        raise NotImplementedError

    def customise_image_tower(self, tower):
        """A kind whose image tower was trained loads its weights here."""
        return tower

    @property
    def image_tower(self):
        """The image tower this model reads, built on first use (on the CPU, in eval mode)."""
        if self._tower is None:
            from taxoclip.models.towers import create_image_tower

            tower = self.customise_image_tower(
                create_image_tower(self.image_tower_name, pretrained=self.image_pretrained)
            )
            self.check_tower_identity(tower)
            self._tower = tower.for_inference(torch.device("cpu"))
        return self._tower

    def check_tower_identity(self, tower) -> None:
        """The tower built here must be the one the model's weights were trained on: another version
        of it (same name and width, other weights) would feed the head features it never saw and
        name a wrong species with confidence."""
        if self.image_tower_id and tower.id != self.image_tower_id:
            raise TaxoclipError(
                f"{self.name}: trained on {self.image_tower_name} with weights {self.image_tower_id}, but "
                f"{self.image_tower_name} here has weights {tower.id} (another version of the tower, or another "
                "tower under its name); install the version it was trained with, or retrain it on this one"
            )

    @property
    def held_out(self) -> list[int]:
        """Class indices kept out of training (``--holdout``), for seen/unseen reports."""
        return list(self.training.get("held_out") or [])

    @torch.no_grad()
    def logits_from_features(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.head()(torch.as_tensor(np.asarray(features, np.float32)))

    def probabilities_from_features(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(features).softmax(-1)

    @torch.no_grad()
    def classify_images(self, images: list) -> torch.Tensor:
        """Class probabilities for PIL images."""
        tower = self.image_tower
        pixels = torch.stack([tower.preprocess.to_uint8(image) for image in images])
        return self.probabilities_from_features(tower.embed(pixels))


class DirectoryClassifier(Classifier):
    """A classifier opened from a model directory: its config.json's image tower record, training
    record and classes.csv, and the trained tower's weights (image_tower.safetensors) when the
    tower trained too."""

    def __init__(self, path: Path, config: dict):
        from taxoclip.models.bundle import read_classes

        self.path, self.config, self.name = path, config, str(path)
        tower = config.get("image_tower") or {}
        self.image_tower_name = tower.get("name", "")
        self.image_pretrained = tower.get("pretrained", True)
        self.image_tower_id = tower.get("id")
        self.training = config.get("training", {})
        self.classes = read_classes(path)

    def customise_image_tower(self, tower):
        from safetensors.torch import load_file

        trained = self.path / "image_tower.safetensors"
        if trained.exists():  # the tower (or its last stages) trained with the model
            tower.load_state_dict(load_file(str(trained)))
        return tower


class EmbeddingHead(nn.Module):
    """Features -> (optional centring and projection) -> normalised embedding -> scaled cosine
    similarity to each class embedding."""

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        scale: float,
        mean: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ):
        super().__init__()
        self.register_buffer("class_embeddings", class_embeddings.float())
        self.register_buffer("mean", None if mean is None else mean.float())
        self.register_buffer("projection", None if projection is None else projection.float())
        self.scale = float(scale)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        if self.mean is not None:
            x = x - self.mean
        if self.projection is not None:
            x = x @ self.projection.T
        return F.normalize(x, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.embed(features) @ self.class_embeddings.T


class EmbeddingClassifier(Classifier):
    """A classifier in a shared image-text space: class embeddings from captions, image features
    centred and projected into the same space, a temperature."""

    class_embeddings: torch.Tensor
    scale: float
    image_mean: torch.Tensor | None = None
    image_projection: torch.Tensor | None = None  # (embed_dim, image width)

    def head(self) -> EmbeddingHead:
        return EmbeddingHead(self.class_embeddings, self.scale, self.image_mean, self.image_projection)

    @torch.no_grad()
    def image_embeddings(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.head().embed(torch.as_tensor(np.asarray(features, np.float32)))
