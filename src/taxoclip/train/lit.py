"""LiT training: tune the text tower against the locked image tower's cached embeddings.

`LiTTrainer` supplies the shared loop (`taxoclip.train.loop`) with LiT's own parts: the data
(cached embeddings), the model (text tower + projections, the text projection ridge-initialised),
its batches (each rank's share of every global batch) and its evaluation; `train_lit` runs it and
writes the model directory. With ``image_in_loop`` the image tower runs on every batch instead
of the cache being read, which is what a trainer without the cache does (e.g. OpenCLIP's
--lock-image); with ``unlock_image`` the image tower trains too (full fine-tuning).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.data.features import FeatureCache, load_features
from taxoclip.errors import TaxoclipError
from taxoclip.models.accuracy import SeenUnseenAccuracy
from taxoclip.models.lit import (
    CaptionBank,
    LiTConfig,
    LiTModel,
    RankBank,
    RankCaptions,
    class_embeddings_of,
    ridge_text_projection,
    save_lit,
)
from taxoclip.models.towers import create_image_tower, create_text_tower
from taxoclip.runtime import Runtime, gather_with_grad
from taxoclip.train.lit_config import LiTSettings
from taxoclip.train.loop import Batch, Trainer, run_training
from taxoclip.train.photos import ShardBatches, embed_split
from taxoclip.train.splits import held_out_classes, split_rows

__all__ = ["LiTSettings", "LiTTrainer", "train_lit"]


def captions_for(cache: FeatureCache, style: str) -> list[str]:
    captions = cache.meta.get("captions") or {}
    by_class = captions.get("by_class")
    if not by_class:
        raise TaxoclipError(f"{cache.path}: the cache has no captions; rebuild it from shards or a source")
    if style not in by_class[0]:
        raise TaxoclipError(f"unknown caption style {style!r}; the cache has {', '.join(by_class[0])}")
    return [entry[style] for entry in by_class]


class LiTStep(nn.Module):
    """The loss of one LiT batch: what DistributedDataParallel wraps and the checkpoint holds.

    ``lit`` always trains; an unlocked image tower is a registered part (trained, checkpointed,
    its gradients averaged across ranks); a locked one only embeds photos (image-in-loop)."""

    def __init__(
        self,
        lit: LiTModel,
        bank: CaptionBank,
        loss: str,
        runtime: Runtime,
        image_tower=None,
        unlock=False,
        ranks: RankBank | None = None,
        rank_weight: float = 0.0,
    ):
        super().__init__()
        self.lit, self.bank, self.loss, self.unlock = lit, bank, loss, unlock
        self.ranks, self.rank_weight = ranks, rank_weight
        self.gather = gather_with_grad if runtime.distributed else None
        if unlock:
            self.image = image_tower
        else:
            self.__dict__["locked_tower"] = image_tower  # not a submodule: never trained nor saved

    def train(self, mode: bool = True) -> LiTStep:
        super().train(mode)
        if self.__dict__.get("locked_tower") is not None:
            self.locked_tower.eval()
        return self

    def forward(self, labels, style_of_class, features=None, pixels=None) -> torch.Tensor:
        if pixels is not None:  # the image tower runs on this batch's photos
            features = self.image(self.image.prepare(pixels)) if self.unlock else self.locked_tower.embed(pixels)
        return self.lit(
            features,
            labels,
            self.bank,
            style_of_class,
            loss=self.loss,
            gather=self.gather,
            ranks=self.ranks,
            rank_weight=self.rank_weight,
        )


class LiTTrainer(Trainer):
    """LiT on the shared loop: the data (cached embeddings, or photos for image-in-loop), the
    model (text tower + projections, ridge-initialised), its batches and its evaluation."""

    def __init__(self, config: LiTSettings, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.cache = load_features(config.features)
        self.embedded: tuple[str, torch.Tensor] | None = None  # (weights fingerprint, class embeddings)
        self.n_classes = len(self.cache.meta["classes"])
        self.held_out = held_out_classes(self.n_classes, config.holdout, config.holdout_seed)
        cache = self.cache
        self.train_rows, self.valid_rows = split_rows(cache, self.held_out)
        if len(self.train_rows) < config.batch_size:
            config.batch_size = max(2, len(self.train_rows))
        # The centring mean and the ridge fit's class means are each one streamed pass over the
        # training rows: the split is never read whole (2.7M rows would be 13.8 GB as float32).
        self.model = self.build_model(cache.mean(self.train_rows))
        self.image_tower = self.build_image_tower()
        self.captions_by_style = [captions_for(cache, style) for style in config.styles]
        self.eval_captions = captions_for(cache, config.eval_style)
        bank = CaptionBank(self.model.text_tower, self.captions_by_style, runtime.device)
        if config.projection_init == "ridge":  # from the bank's prefix: the frozen blocks run once
            self.initialise_text_projection(bank)
        self.rank_captions = RankCaptions(cache.meta["classes"]) if config.rank_weight else None
        ranks = RankBank(self.model.text_tower, self.rank_captions, runtime.device) if self.rank_captions else None
        self.module = LiTStep(
            self.model, bank, config.loss, runtime, self.image_tower, config.unlock_image, ranks, config.rank_weight
        )
        self.shard_batches = (
            ShardBatches(config.shards, self.image_tower.preprocess, config.batch_size)
            if self.image_tower is not None
            else None
        )

    def build_model(self, image_mean: np.ndarray) -> LiTModel:
        config, cache = self.config, self.cache
        text_tower = create_text_tower(config.text_tower)
        width = cache.features.shape[1]
        lit_config = LiTConfig(
            image_tower=cache.meta["tower"]["name"],
            image_pretrained=cache.meta["tower"].get("pretrained", True),
            text_tower=config.text_tower,
            image_width=width,
            text_width=text_tower.width,
            embed_dim=config.embed_dim or width,
            image_projection=config.image_projection,
            text_layers=config.text_layers,
        )
        if lit_config.embed_dim != width and not lit_config.image_projection:
            raise TaxoclipError("--embed-dim other than the image width needs --image-projection")
        return LiTModel(lit_config, text_tower, image_mean=image_mean).to(self.runtime.device)

    def build_image_tower(self):
        if not (self.config.image_in_loop or self.config.unlock_image):
            return None
        meta = self.cache.meta["tower"]
        tower = create_image_tower(meta["name"], pretrained=meta.get("pretrained", True)).to(self.runtime.device)
        if tower.id != meta["id"]:
            raise TaxoclipError(f"the image tower {meta['name']} is not the one that made {self.config.features}")
        return tower.requires_grad_(self.config.unlock_image)

    def initialise_text_projection(self, bank: CaptionBank) -> None:
        class_means = class_mean_embeddings(self.model, self.cache, self.train_rows, self.n_classes)
        has_class = torch.zeros(self.n_classes, dtype=torch.bool)
        has_class[np.unique(self.cache.labels[self.train_rows])] = True
        device = self.runtime.device
        ridge_text_projection(self.model, bank, class_means.to(device), has_class.to(device))

    def param_groups(self) -> list[dict]:
        """Text blocks (and an unlocked image tower) at text_lr; projections and temperature at lr."""
        config, model = self.config, self.model
        heads = [model.text_projection.weight] + ([model.image_projection.weight] if model.image_projection else [])
        groups = [
            {"params": [p for p in model.text_tower.parameters() if p.requires_grad], "lr": config.text_lr},
            {"params": heads, "lr": config.lr},
            {"params": [model.logit_scale], "lr": config.lr, "weight_decay": 0.0},
        ]
        if config.unlock_image:
            groups.append({"params": list(self.image_tower.parameters()), "lr": config.text_lr})
        return [{"weight_decay": config.weight_decay} | group for group in groups]

    def steps_per_epoch(self) -> int:
        steps = len(self.train_rows) // self.config.batch_size  # drop the ragged end: equal batches
        return min(steps, self.config.max_steps_per_epoch or steps)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's share of each global batch: cached embeddings, or photos for the image tower."""
        config, runtime, device = self.config, self.runtime, self.runtime.device
        steps = self.steps_per_epoch()
        if self.shard_batches is not None:
            photos = self.shard_batches.epoch(epoch, self.held_out)
            for step, (pixels, labels) in enumerate(photos):
                mine = slice(runtime.rank, None, runtime.world_size)
                inputs = {"pixels": pixels[mine].to(device), "labels": labels[mine].to(device)}
                inputs["style_of_class"] = self.style_of_class(epoch * steps + step).to(device)
                yield Batch(inputs, len(inputs["labels"]))
            return
        order = np.random.default_rng([config.seed, epoch]).permutation(self.train_rows)
        for step in range(steps):
            global_batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            rows = np.sort(runtime.share(global_batch))
            features = torch.from_numpy(np.asarray(self.cache.features[rows], dtype=np.float32)).to(device)
            labels = torch.from_numpy(self.cache.labels[rows].astype(np.int64)).to(device)
            style = self.style_of_class(epoch * steps + step).to(device)
            yield Batch({"features": features, "labels": labels, "style_of_class": style}, len(rows))

    def style_of_class(self, global_step: int) -> torch.Tensor:
        """The caption style each class uses in this step (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.config.seed * 7919 + global_step)
        return torch.randint(len(self.config.styles), (self.n_classes,), generator=generator)

    def evaluate(self, epoch: int) -> dict:
        valid_features = None
        if self.config.unlock_image:  # the cache holds the old tower's embeddings: embed the photos again
            valid_features, _ = embed_split(self.config.shards, self.image_tower, "valid")
        return evaluate(
            self.model,
            self.cache,
            self.valid_rows,
            self.class_embeddings(),
            self.held_out,
            self.runtime.device,
            valid_features,
        )

    def class_embeddings(self) -> torch.Tensor:
        """The classifier (every class's evaluation caption, embedded), encoded again only when the
        weights changed: the last evaluation and the saved model share one pass over the captions
        (at 10,000 classes each pass is minutes on a laptop)."""
        key = weights_fingerprint(self.model)
        if self.embedded is None or self.embedded[0] != key:
            embeddings = class_embeddings_of(
                self.model, self.eval_captions, self.rank_captions, self.config.rank_weight
            )
            self.embedded = (key, embeddings)
        return self.embedded[1]

    def epoch_extras(self) -> dict:
        return {"temperature": float(1 / self.model.scale().detach())}


def train_lit(config: LiTSettings) -> dict:
    """Train on the shared loop, evaluating on valid; save the model directory (rank 0) and
    return the last epoch's metrics."""
    trainer, history, runtime = run_training(config, LiTTrainer, lambda t: t.cache.meta["cache_key"])
    if runtime.is_main:
        save_lit(
            Path(config.output),
            trainer.model,
            trainer.cache,
            config.eval_style,
            training=asdict(config) | {"held_out": trainer.held_out.tolist(), "world_size": runtime.world_size},
            image_tower=trainer.image_tower if config.unlock_image else None,
            rank_weight=config.rank_weight,
            class_embeddings=trainer.class_embeddings(),
        )
    runtime.barrier()
    return history[-1] if history else {}


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every weight and buffer: equal exactly when the module computes the same."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        # hashed where it lies (a buffer view): a bytes copy would add the largest weight, the
        # text tower's 100 MB token table, to the end-of-epoch peak
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def class_mean_embeddings(model: LiTModel, cache: FeatureCache, rows: np.ndarray, n_classes: int) -> torch.Tensor:
    """Per class, the sum of its rows' centred, normalised embeddings: one streamed pass."""
    mean = model.image_mean.cpu()
    sums = torch.zeros(n_classes, cache.features.shape[1])
    for part, features in cache.chunks(rows):
        centred = torch.nn.functional.normalize(torch.from_numpy(features) - mean, dim=-1)
        sums.index_add_(0, torch.from_numpy(cache.labels[part].astype(np.int64)), centred)
    return sums


@torch.no_grad()
def evaluate(
    model: LiTModel,
    cache: FeatureCache,
    rows: np.ndarray,
    class_embeddings: torch.Tensor,
    held_out: np.ndarray,
    device: torch.device,
    features: torch.Tensor | None = None,
) -> dict:
    """Zero-shot top-1/top-5 on the valid rows over all classes (``class_embeddings``: the
    classifier); with held-out classes, also the seen classes' accuracy and the held-out classes'
    accuracy among themselves. Rows are read and scored a chunk at a time (``features``:
    embeddings of a trained tower, in row order)."""
    if len(rows) == 0:
        return {}
    model.eval()
    class_embeddings = class_embeddings.to(device)
    total = SeenUnseenAccuracy(held_out)
    chunk = 1024  # 1,024 x 10,000 classes of scores: 41 MB at a time
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        if features is None:
            inputs = torch.from_numpy(np.asarray(cache.features[part], np.float32))
        else:
            inputs = features[start : start + chunk]
        image = model.encode_image_features(inputs.to(device))
        total.add(image @ class_embeddings.T, torch.from_numpy(cache.labels[part].astype(np.int64)))
    model.train()
    return total.result()
