"""The LiT model: a locked image tower (represented by its cached embeddings) and a trainable text
tower projected into the same space, with a learnable temperature.

Image side: ``(features - mean)`` then, optionally, a linear map. Centring by the training-set
mean is fixed (computed once from the cache): CNN features are all positive, and cosine
similarity between uncentred ones is dominated by their common direction.
Text side: the text tower (only its top layers train, the rest is cached per caption) and a
linear projection, which can start from a ridge-regression fit of the pretrained caption
embeddings onto class-mean image embeddings, so training starts from a working classifier.

Hierarchy-aware targets (``rank_weight > 0``): besides each photo's species caption, the photo is
also contrasted at the genus, family and order ranks against captions of those ranks ("A photo of
the family Ranunculaceae"), so the text tower learns what a family looks like from every seen
species in it. A class's embedding is then its species caption's plus ``rank_weight`` times its
ranks' (the sum of cosine scores): a species never seen in training still scores through the
family and order its relatives taught.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from taxoclip.models.classifier import DirectoryClassifier, EmbeddingClassifier
from taxoclip.models.losses import bucketed, class_contrastive_loss, clip_loss, unique_targets
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
        ranks: RankBank | None = None,
        rank_weight: float = 0.0,
    ) -> torch.Tensor:
        """The loss of one batch. ``style_of_class[c]`` is the caption style used for class c in
        this step; ``gather`` (distributed) joins image embeddings and labels of all ranks;
        ``ranks`` adds the hierarchy-aware terms, each weighted ``rank_weight``."""
        image = self.encode_image_features(image_features)
        if gather is not None:
            image, labels = gather(image, labels)
        if loss == "class":
            classes, targets = unique_targets(labels)
            padded = bucketed(classes)
            text = self.encode_text_prefix(captions.select(padded, style_of_class[padded]))[: len(classes)]
            total = class_contrastive_loss(image, text, targets, self.scale())
            for bank, value_of_class in ranks.banks if ranks is not None and rank_weight else ():
                values = value_of_class.to(labels.device)[labels]
                known = values >= 0  # a class with no value at this rank sits this term out
                if known.sum() < 2:
                    continue
                distinct, value_targets = unique_targets(values[known])
                padded = bucketed(distinct)
                text = self.encode_text_prefix(bank.select(padded, torch.zeros_like(padded)))[: len(distinct)]
                total = total + rank_weight * class_contrastive_loss(image[known], text, value_targets, self.scale())
            return total
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
        # Written batch by batch into one tensor: a list of parts then torch.cat held the bank
        # twice (10,000 classes x 31 tokens x 384 floats is 476 MB once).
        self.prefix: dict[str, torch.Tensor] = {}
        for i in range(0, len(flat), batch_size):
            part = text_tower.prefix({k: v[i : i + batch_size] for k, v in tokens.items()})
            for k, v in part.items():
                if k not in self.prefix:
                    self.prefix[k] = v.new_empty((len(flat), *v.shape[1:]))
                self.prefix[k][i : i + len(v)] = v

    def select(self, classes: torch.Tensor, styles: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prefix rows of these (class, style) captions, trimmed to their longest caption."""
        rows = (styles * self.n_classes + classes).to(next(iter(self.prefix.values())).device)
        chosen = {k: v[rows] for k, v in self.prefix.items()}
        mask = chosen.get("attention_mask")
        if mask is not None:
            length = int(mask.sum(1).max())
            chosen = {k: v[:, :length] for k, v in chosen.items()}
        return chosen


RANKS_FOR_TARGETS = ("genus", "family", "order")


def rank_caption(rank: str, value: str) -> str:
    return f"A photo of the {rank} {value}"


class RankCaptions:
    """Per rank: the distinct captions of its values, and each class's value among them (-1: the
    class has none at that rank)."""

    def __init__(self, class_rows: list[dict], ranks: tuple[str, ...] = RANKS_FOR_TARGETS):
        self.ranks, self.captions, of_class = ranks, [], []
        for rank in ranks:
            values = sorted({row.get(rank, "") for row in class_rows} - {""})
            position = {v: i for i, v in enumerate(values)}
            self.captions.append([rank_caption(rank, v) for v in values])
            of_class.append([position.get(row.get(rank, ""), -1) for row in class_rows])
        self.of_class = torch.tensor(of_class, dtype=torch.long).reshape(len(ranks), len(class_rows))


class RankBank:
    """The rank captions as the training step needs them (frozen text-tower prefix, computed once)."""

    def __init__(self, text_tower: TextTower, ranks: RankCaptions, device: torch.device):
        self.banks = [
            (CaptionBank(text_tower, [captions], device), ranks.of_class[i])
            for i, captions in enumerate(ranks.captions)
            if captions
        ]


@torch.no_grad()
def rank_part(model: LiTModel, ranks: RankCaptions, rank_weight: float) -> torch.Tensor:
    """``rank_weight`` times the sum of each class's genus, family and order caption embeddings:
    added to the species caption's embedding, the head's dot product adds their cosine scores."""
    part = torch.zeros(ranks.of_class.shape[1], model.config.embed_dim)
    for captions, of_class in zip(ranks.captions, ranks.of_class, strict=True):
        if captions:
            encoded = torch.cat([model.encode_captions(captions).cpu(), torch.zeros(1, part.shape[1])])
            part += rank_weight * encoded[of_class]  # -1 (no value at this rank) picks the zero row
    return part


def class_embeddings_of(
    model: LiTModel, species_captions: list[str], ranks: RankCaptions | None = None, rank_weight: float = 0.0
) -> torch.Tensor:
    """Each class's embedding: its species caption's, plus its ranks' with hierarchy-aware targets."""
    embeddings = model.encode_captions(species_captions).cpu()
    return embeddings + rank_part(model, ranks, rank_weight) if ranks is not None and rank_weight else embeddings


@torch.no_grad()
def ridge_text_projection(
    model: LiTModel,
    bank: CaptionBank,
    class_means: torch.Tensor,
    has_class: torch.Tensor,
    ridge: float = 1e-2,
    batch_size: int = 256,
) -> None:
    """Start the text projection as the ridge fit of pretrained caption embeddings (the bank's
    first style, run on from its frozen prefix: the frozen blocks never run twice) onto the
    (centred, normalised) class-mean image embeddings of the classes with training images."""
    text = model.text_tower.eval()
    device = model.logit_scale.device
    # In batches: 10,000 captions through the tower at once held several GB of activations.
    parts = []
    for start in range(0, bank.n_classes, batch_size):
        classes = torch.arange(start, min(start + batch_size, bank.n_classes))
        parts.append(text.from_prefix(bank.select(classes, torch.zeros_like(classes))))
    t = torch.cat(parts)[has_class]
    target = F.normalize(class_means[has_class], dim=-1)
    if model.image_projection is not None:
        target = F.normalize(model.image_projection(target), dim=-1)
    gram = t.T @ t + ridge * len(t) * torch.eye(t.shape[1], device=device)
    weight = torch.linalg.solve(gram, t.T @ target)  # (text_width, embed_dim)
    model.text_projection.weight.copy_(weight.T)
    text.train()


# --- the model directory ------------------------------------------------------------------------
#
# config.json               kind "lit", towers by name, the LiT shape, caption style, training record
# model.safetensors         text tower, projections, image centring, temperature
# image_tower.safetensors   only when the image tower was trained too
# classes.csv               the class table (index order)
# captions.json             every class's captions in every style, and the caption configuration
# class_embeddings.npy      the classifier: each class's caption embedding (evaluation style)


def save_lit(
    out: Path,
    model: LiTModel,
    cache,
    eval_style: str,
    *,
    training: dict,
    class_embeddings: torch.Tensor,
    image_tower=None,
    rank_weight: float = 0.0,
) -> None:
    """Write a LiT model directory from a trained model, its classifier (``class_embeddings``,
    of the ``eval_style`` captions) and the feature cache it trained on."""
    from taxoclip.models.bundle import save_weights, write_config
    from taxoclip.taxonomy import ClassTable

    out.mkdir(parents=True, exist_ok=True)
    captions = cache.meta["captions"]
    class_embeddings = class_embeddings.cpu().numpy()
    save_weights(out / "model.safetensors", model)
    if image_tower is not None:
        save_weights(out / "image_tower.safetensors", image_tower)
    ClassTable.from_json(cache.meta["classes"]).to_csv(out / "classes.csv")
    (out / "captions.json").write_text(json.dumps(captions, indent=1, ensure_ascii=False))
    np.save(out / "class_embeddings.npy", class_embeddings.astype(np.float32))
    tower = image_tower.describe() if image_tower is not None else cache.meta["tower"]  # trained: its new id
    fields = {"lit": model.config.to_json(), "eval_style": eval_style, "image_tower": tower, "rank_weight": rank_weight}
    write_config(out, "lit", fields | {"training": training})


class LiTClassifier(EmbeddingClassifier, DirectoryClassifier):
    """A trained LiT model ready to classify. Opening it reads only the image-side head (centring,
    projection, temperature) and the stored class embeddings: predicting never builds the text
    tower. The text tower is loaded on demand, to embed captions of another style."""

    kind = "lit"

    def __init__(self, path: Path, config: dict):
        super().__init__(path, config)
        self.lit_config = LiTConfig(**config["lit"])
        self.image_tower_name = self.lit_config.image_tower
        self.image_pretrained = self.lit_config.image_pretrained
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            self.image_mean = weights.get_tensor("image_mean")
            if "image_projection.weight" in weights.keys():  # noqa: SIM118 (safe_open has no __contains__)
                self.image_projection = weights.get_tensor("image_projection.weight")
            logit_scale = weights.get_tensor("logit_scale").clamp(max=self.lit_config.max_logit_scale)
        self.scale = float(logit_scale.exp())
        self.class_embeddings = torch.from_numpy(np.load(path / "class_embeddings.npy"))
        self._model: LiTModel | None = None

    @property
    def model(self) -> LiTModel:
        """The whole LiT model, text tower included (built on first use)."""
        if self._model is None:
            from taxoclip.models.towers import create_text_tower

            text_tower = create_text_tower(self.lit_config.text_tower, pretrained=False)  # weights: the bundle's
            model = LiTModel(self.lit_config, text_tower)
            model.load_state_dict(load_file(str(self.path / "model.safetensors")))
            self._model = model.eval()
        return self._model

    def use_style(self, style: str) -> None:
        """Classify with another caption style, or ``templates`` (a CLIP-style prompt ensemble);
        the class embeddings are cached in the model directory."""
        from taxoclip.data.shards import sha256_of
        from taxoclip.models.caption_embeddings import caption_sets, class_embeddings_cached

        by_class = json.loads((self.path / "captions.json").read_text())["by_class"]
        sets = caption_sets(by_class, self.classes, style)
        # Keyed by the weights file, so a model retrained in the same folder gets new embeddings.
        tag = f"lit|{sha256_of(self.path / 'model.safetensors')[:16]}"
        embeddings = class_embeddings_cached(self.model.encode_captions, sets, self.path, tag=tag)
        weight = self.config.get("rank_weight") or 0.0
        if weight:  # composed as the saved class embeddings are: species + ranks
            embeddings = embeddings + rank_part(self.model, RankCaptions(list(self.classes.rows)), weight)
        self.class_embeddings = embeddings


def load_lit(path: Path, config: dict) -> LiTClassifier:
    """The registry's entry for kind "lit"."""
    return LiTClassifier(path, config)
