"""CatLIP training on the shared loop: the label layer on the locked tower's cached embeddings.

Labels come from the vocabulary (`taxoclip labels`, or built here from the cache's training
classes). Each class's multi-hot target row is fixed, so a batch's targets are a row look-up.
Held-out classes (``--holdout``) contribute no image, so their species labels are not in the
vocabulary and they are scored, like any new class table, through the labels they share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.data.features import extract_features, load_features
from taxoclip.data.labels import Vocabulary, build_vocabulary, class_labels, label_data
from taxoclip.data.shards import read_manifest
from taxoclip.errors import TaxoclipError
from taxoclip.eval.zeroshot import seen_unseen_accuracy
from taxoclip.models.catlip import LabelHead, catlip_loss, class_head, fit_temperature, save_catlip
from taxoclip.models.split import UpperPart, split_tower
from taxoclip.models.towers import create_image_tower
from taxoclip.runtime import Runtime, seed_everything, setup
from taxoclip.train.catlip_config import CatLIPConfig
from taxoclip.train.loop import Batch, LoopConfig, Trainer, fit
from taxoclip.train.photos import ShardBatches, crop_and_flip, embed_split
from taxoclip.train.splits import held_out_classes, split_rows

__all__ = ["CatLIPConfig", "CatLIPTrainer", "train_catlip"]

STANDARDISE_ROWS = 4096  # training rows whose embeddings set the label layer's input standardisation


class CatLIPStep(nn.Module):
    """The loss of one batch: label logits against the classes' multi-hot targets. With an
    ``upper`` part, the cached inputs are lower-stage activations that it turns into embeddings."""

    def __init__(self, head: LabelHead, targets: torch.Tensor, upper: UpperPart | None = None):
        super().__init__()
        self.head, self.upper = head, upper
        self.register_buffer("targets", targets, persistent=False)  # (classes, labels), fixed

    def train(self, mode: bool = True) -> CatLIPStep:
        """Training mode, except the upper part's batch norms, which keep their running statistics:
        the embeddings the label layer learns on are then the ones the saved tower gives at
        prediction time, and every rank normalises alike (their affine weights still train)."""
        super().train(mode)
        if self.upper is not None:
            for module in self.upper.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.upper(features) if self.upper is not None else features
        return catlip_loss(self.head(embeddings), self.targets[labels])


class TowerOnPixels(nn.Module):
    """uint8 photos -> the whole (trainable) tower's embeddings: CatLIP's ``full`` depth."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(self.tower.prepare(pixels))


class CatLIPTrainer(Trainer):
    """CatLIP on the shared loop at one of three depths: the label layer on cached embeddings
    (``head``), the tower's last stages too on cached activations (``upper``), or the whole tower
    on augmented photos (``full``)."""

    def __init__(self, config: CatLIPConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tower, self.upper, self.cache, self.photos = None, None, None, None
        self.last_valid: tuple[torch.Tensor, torch.Tensor] | None = None  # embeddings of the latest evaluation
        if config.depth == "full":
            self.tower = create_image_tower(config.tower, pretrained=config.pretrained).to(runtime.device)
            self.upper = TowerOnPixels(self.tower)
            self.classes, captions, images = label_data(config.shards, "train")
            augment = crop_and_flip if config.augment else None
            self.photos = ShardBatches(config.shards, self.tower.preprocess, config.batch_size, augment=augment)
        else:
            if config.depth == "head":
                self.cache = load_features(config.features)
            else:  # the lower stages run once over the photos; their activations are cached
                self.tower = create_image_tower(config.tower, pretrained=config.pretrained)
                lower, upper = split_tower(self.tower, config.train_blocks)
                folder = config.activations or Path(config.output) / "activations"
                self.cache = extract_features(config.shards, lower, folder, progress=config.progress)
                self.upper = upper.to(runtime.device)
            self.classes, captions = self.cache.classes, (self.cache.meta.get("captions") or {}).get("by_class")
        self.held_out = held_out_classes(len(self.classes), config.holdout, config.holdout_seed)
        if self.cache is not None:
            self.train_rows, self.valid_rows = split_rows(self.cache, self.held_out)
            images = np.bincount(self.cache.labels[self.train_rows], minlength=len(self.classes))
        else:
            images = np.asarray(images or [0] * len(self.classes))
            images[self.held_out] = 0
        if images.sum() == 0:
            raise TaxoclipError(f"{config.features or config.shards}: no training photos (split 'train') to learn from")
        self.images_per_class = images
        self.vocabulary = self.load_vocabulary(captions)
        targets = torch.zeros(len(self.classes), len(self.vocabulary), dtype=torch.bool)  # a quarter of float's size
        for c, indices in enumerate(self.vocabulary.class_labels):
            targets[c, indices] = True
        sample = self.standardisation_sample()
        head = LabelHead(sample.shape[1], len(self.vocabulary), sample.mean(0), sample.std(0))
        frequency = (torch.from_numpy(images).float() @ targets.float()) / float(images.sum())
        head.start_from_prior(frequency)
        self.head = head.to(runtime.device)
        self.module = CatLIPStep(self.head, targets.to(runtime.device), self.upper)

    def standardisation_sample(self) -> torch.Tensor:
        """Embeddings of up to STANDARDISE_ROWS training photos, to standardise the label layer's input."""
        if self.cache is not None:
            return self.embed(self.train_rows[:: max(1, len(self.train_rows) // STANDARDISE_ROWS)])
        photos = ShardBatches(self.config.shards, self.tower.preprocess, 512).epoch(0, self.held_out)
        pixels, _ = next(photos)
        photos.close()  # stop its decoding workers before any other loader starts
        was_training = self.tower.training
        with torch.no_grad():
            sample = self.tower.eval().embed(pixels.to(self.runtime.device)).cpu()
        self.tower.train(was_training)
        return sample

    @torch.no_grad()
    def embed(self, rows: np.ndarray, chunk: int = 512) -> torch.Tensor:
        """Tower embeddings of cached rows (on the CPU): the cache itself, or the upper part's
        output on the cached activations (evaluation mode, then back)."""
        if self.upper is None:
            return torch.from_numpy(np.asarray(self.cache.features[rows], dtype=np.float32))
        was_training = self.upper.training
        self.upper.eval()
        device = self.runtime.device
        parts = [
            self.upper(torch.from_numpy(np.asarray(self.cache.features[rows[i : i + chunk]])).to(device)).cpu()
            for i in range(0, len(rows), chunk)
        ]
        self.upper.train(was_training)
        return torch.cat(parts)

    def valid_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeddings, labels) of the valid photos with the tower as it is now; None without valid."""
        if self.cache is None:
            if not any(s["split"] == "valid" for s in read_manifest(Path(self.config.shards))["shards"]):
                return None
            return embed_split(self.config.shards, self.tower, "valid")
        if len(self.valid_rows) == 0:
            return None
        return self.embed(self.valid_rows), torch.from_numpy(self.cache.labels[self.valid_rows].astype(np.int64))

    def load_vocabulary(self, captions: list[dict] | None) -> Vocabulary:
        """The given vocabulary (checked against the classes) or one built from the training
        photos, with each class's labels in it."""
        config, classes, images = self.config, self.classes, self.images_per_class
        if config.vocabulary:
            given = Vocabulary.load(config.vocabulary)
            per_class = class_labels(classes, captions, given.extractor, given.style)
            given.class_ids, given.class_labels = classes.ids, given.labels_of(classes, per_class)
            vocabulary = given
        else:
            per_class = class_labels(classes, captions, config.extractor, config.style)
            vocabulary = build_vocabulary(
                classes,
                per_class,
                images.tolist(),
                extractor=config.extractor,
                style=config.style,
                min_count=config.min_count,
                max_size=config.max_size,
            )
        trained = [c for c in np.flatnonzero(images) if not vocabulary.class_labels[c]]
        if trained:
            ids = ", ".join(classes.ids[c] for c in trained[:10])
            raise TaxoclipError(
                f"{len(trained)} training classes carry no label of the vocabulary ({ids}): their photos would "
                "teach nothing. Lower --min-count, or use a vocabulary made from these classes"
            )
        return vocabulary

    def param_groups(self) -> list[dict]:
        config = self.config
        groups = [
            {"params": [self.head.linear.weight], "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": [self.head.linear.bias], "lr": config.lr, "weight_decay": 0.0},
        ]
        if self.upper is not None:
            groups.append({"params": list(self.upper.parameters()), "lr": config.tower_lr, "weight_decay": 0.0})
        return groups

    def steps_per_epoch(self) -> int:
        steps = max(1, int(self.images_per_class.sum()) // self.config.batch_size)
        return min(steps, self.config.max_steps_per_epoch or steps)

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's share of each global batch: cached rows, or (``full``) augmented photos."""
        runtime, device = self.runtime, self.runtime.device
        if self.photos is not None:
            for pixels, labels in self.photos.epoch(epoch, self.held_out):
                mine = slice(runtime.rank, None, runtime.world_size)
                yield Batch({"features": pixels[mine].to(device), "labels": labels[mine].to(device)}, len(labels[mine]))
            return
        size = min(self.config.batch_size, len(self.train_rows))
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_rows)
        for step in range(self.steps_per_epoch()):
            rows = np.sort(runtime.share(order[step * size : (step + 1) * size]))
            features = torch.from_numpy(np.asarray(self.cache.features[rows], dtype=np.float32)).to(device)
            labels = torch.from_numpy(self.cache.labels[rows].astype(np.int64)).to(device)
            yield Batch({"features": features, "labels": labels}, len(rows))

    def classifier(self) -> torch.nn.Module:
        return class_head(
            self.head, self.vocabulary, self.vocabulary.class_labels, self.classes.ids, self.config.scoring
        )[0]

    @torch.no_grad()
    def calibrate(self) -> float:
        """The softmax temperature fitted on valid (the ranking, and so accuracy, is unchanged);
        1 without valid photos. The last epoch is always evaluated: its embeddings are reused."""
        valid = self.last_valid if self.last_valid is not None else self.valid_embeddings()
        return 1.0 if valid is None else fit_temperature(self.classifier()(valid[0]), valid[1])

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict:
        """Top-1/top-5 on valid over all classes from the label logits; with held-out classes,
        the seen classes' top-1 and the unseen ones' among themselves."""
        valid = self.last_valid = self.valid_embeddings()
        return {} if valid is None else seen_unseen_accuracy(self.classifier(), valid[0], valid[1], self.held_out)


def train_catlip(config: CatLIPConfig) -> dict:
    """Train on the shared loop and write the model directory (kind ``catlip``); returns the last
    epoch's metrics."""
    config.check()
    runtime = setup(config.device)
    seed_everything(config.seed)
    trainer = CatLIPTrainer(config, runtime)
    signature = {k: v for k, v in asdict(config).items() if k not in ("progress", "device", "output")}
    signature["data"] = trainer.cache.meta["cache_key"] if trainer.cache is not None else trainer.photos.plan.data_id
    history = fit(trainer, LoopConfig.from_settings(config, signature=signature), runtime)
    if runtime.is_main:
        training = asdict(config) | {"held_out": trainer.held_out.tolist(), "world_size": runtime.world_size}
        save_catlip(
            Path(config.output),
            trainer.head,
            trainer.vocabulary,
            trainer.classes,
            trainer.cache.meta["tower"] if trainer.tower is None else trainer.tower.describe(),
            training,
            config.scoring,
            trainer.calibrate(),
            image_tower=trainer.tower,
        )
    runtime.barrier()
    return history[-1] if history else {}
