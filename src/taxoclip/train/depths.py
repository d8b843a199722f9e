"""Where a classifier trainer's image embeddings come from, at one of three depths: the piece CatLIP
and supervised fine-tuning share.

  head   the locked tower's cached embeddings (the feature cache): only the head trains
  upper  the tower's last --train-blocks stages train too, on cached activations of the stages
         below (run once over the photos, cached like features: with the lower stages locked and
         no augmentation, their output never changes)
  full   the whole tower, on augmented photos streamed from the shards

Training photos exclude held-out classes (``--holdout``) and the selection split (``--select``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taxoclip.data.features import load_features
from taxoclip.data.labels import label_data
from taxoclip.data.shards import read_manifest
from taxoclip.errors import TaxoclipError
from taxoclip.models.extraction import extract_features
from taxoclip.runtime import Runtime
from taxoclip.train.loop import Batch
from taxoclip.train.photos import ShardBatches, crop_and_flip, embed_split
from taxoclip.train.selection import SelectionSplit
from taxoclip.train.splits import held_out_classes, split_rows

EVAL_CHUNK = 4096  # valid / selection rows scored at a time (their logits: 160 MB at 10,000 classes)

STANDARDISE_ROWS = 4096  # training rows whose embeddings set a head's input standardisation


class TowerOnPixels(nn.Module):
    """uint8 photos -> the whole (trainable) tower's embeddings: depth ``full``."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(self.tower.prepare(pixels))


def freeze_batch_norm_statistics(module: nn.Module | None) -> None:
    """Batch norms keep their running statistics (their affine weights still train): the embeddings
    a head learns on are then the ones the saved tower gives at prediction time, and every rank
    normalises alike. Called after ``train()``."""
    if module is not None:
        for child in module.modules():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.eval()


class TowerSource:
    """The training photos' embeddings at one depth: ``upper`` is the trainable part (None at depth
    head), ``batches`` yields this rank's share of each global batch of its inputs."""

    def __init__(self, config, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tower, self.upper, self.cache, self.photos = None, None, None, None
        self.selection = SelectionSplit(config.select_fraction, config.select_seed)
        if config.depth == "full":
            from taxoclip.models.towers import create_image_tower

            self.tower = create_image_tower(config.tower, pretrained=config.pretrained).to(runtime.device)
            self.upper = TowerOnPixels(self.tower)
            self.classes, self.captions, images = label_data(config.shards, "train")
            self.augment = crop_and_flip if config.augment else None  # after any repetition: copies crop anew
            self.photos = ShardBatches(
                config.shards, self.tower.preprocess, config.batch_size, keep=self.selection.complement()
            )
        else:
            if config.depth == "head":
                self.cache = load_features(config.features)
            else:
                from taxoclip.models.split import split_tower
                from taxoclip.models.towers import create_image_tower

                self.tower = create_image_tower(config.tower, pretrained=config.pretrained)
                lower, upper = split_tower(self.tower, config.train_blocks)
                folder = config.activations or Path(config.output) / "activations"
                self.cache = extract_features(config.shards, lower, folder, progress=config.progress)
                self.upper = upper.to(runtime.device)
            self.classes = self.cache.classes
            self.captions = (self.cache.meta.get("captions") or {}).get("by_class")
        self.held_out = held_out_classes(len(self.classes), config.holdout, config.holdout_seed)
        if self.cache is not None:
            train_rows, self.valid_rows = split_rows(self.cache, self.held_out)
            self.select_rows = self.selection.rows(self.cache.keys, train_rows)
            self.train_rows = self.selection.complement().rows(self.cache.keys, train_rows)
            images = np.bincount(self.cache.labels[self.train_rows], minlength=len(self.classes))
        else:  # streamed photos: the manifest's counts, less the selection's expected share
            images = np.asarray(images or [0] * len(self.classes), dtype=np.float64) * (1 - config.select_fraction)
            images = np.round(images).astype(np.int64)
            images[self.held_out] = 0
        if images.sum() == 0:
            raise TaxoclipError(f"{config.features or config.shards}: no training photos (split 'train') to learn from")
        self.images_per_class = images

    @property
    def data_id(self) -> str:
        """What the run trained on, for its resume signature (cache or shards, by content)."""
        return self.cache.meta["cache_key"] if self.cache is not None else self.photos.plan.data_id

    def tower_record(self) -> dict:
        """The image tower a model trained here reads (its weights' id included)."""
        return self.cache.meta["tower"] if self.tower is None else self.tower.describe()

    def standardisation_sample(self) -> torch.Tensor:
        """Embeddings of up to STANDARDISE_ROWS training photos, to standardise a head's input."""
        if self.cache is not None:
            return self.embed(self.train_rows[:: max(1, len(self.train_rows) // STANDARDISE_ROWS)])
        photos = ShardBatches(self.config.shards, self.tower.preprocess, 512, keep=self.selection.complement())
        batches = photos.epoch(0, self.held_out)
        pixels, _ = next(batches)
        batches.close()  # stop its decoding workers before any other loader starts
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
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def split_embeddings(self, part: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeddings, labels) of ``valid`` or ``select`` with the tower as it is now; None when
        that part has no photos."""
        if self.cache is None:
            if part == "select":
                if self.selection.fraction <= 0:
                    return None
                found = embed_split(self.config.shards, self.tower, "train", keep=self.selection)
            elif any(s["split"] == "valid" for s in read_manifest(Path(self.config.shards))["shards"]):
                found = embed_split(self.config.shards, self.tower, "valid")
            else:
                return None
            if part == "select" and len(self.held_out):
                mask = ~torch.isin(found[1], torch.from_numpy(self.held_out))
                found = found[0][mask], found[1][mask]
            return found if len(found[1]) else None
        rows = self.valid_rows if part == "valid" else self.select_rows
        if len(rows) == 0:
            return None
        return self.embed(rows), torch.from_numpy(self.cache.labels[rows].astype(np.int64))

    def split_chunks(
        self, part: str, chunk: int | None = None, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(embeddings, labels) of ``valid`` or ``select`` a chunk at a time, with the tower as it
        is now: a cached split is never held whole as float32 (iNat2021's valid would be 512 MB of
        it, and its logits over 10,000 classes 4 GB). ``limit``: at most that many rows, a fixed
        sample spread evenly over the split. Without a cache (photos) the split is embedded first."""
        chunk = chunk or EVAL_CHUNK
        if self.cache is None:
            found = self.split_embeddings(part)
            if found is not None:
                keep = spread(len(found[1]), limit)
                embeddings, labels = found[0][keep], found[1][keep]
                for start in range(0, len(labels), chunk):
                    yield embeddings[start : start + chunk], labels[start : start + chunk]
            return
        rows = self.valid_rows if part == "valid" else self.select_rows
        rows = rows[spread(len(rows), limit)]
        for start in range(0, len(rows), chunk):
            some = rows[start : start + chunk]
            yield self.embed(some), torch.from_numpy(self.cache.labels[some].astype(np.int64))

    def batches(
        self,
        epoch: int,
        order: np.ndarray | None = None,
        repeat: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> Iterator[Batch]:
        """This rank's share of each global batch: cached rows in ``order`` (default: the training
        rows shuffled), or augmented photos, each used ``repeat(labels)`` times (default once)."""
        runtime, device, size = self.runtime, self.runtime.device, self.config.batch_size
        if self.photos is not None:
            stream = self.photos.epoch(epoch, self.held_out)
            if repeat is not None:
                stream = repeated(stream, repeat, size, torch.Generator().manual_seed(7_919 * (epoch + 1)))
            crops = torch.Generator().manual_seed(10_007 * (epoch + 1))  # the same crops on every rank
            for pixels, labels in stream:
                if self.augment is not None:
                    pixels = self.augment(pixels, crops)
                mine = slice(runtime.rank, None, runtime.world_size)
                yield Batch({"features": pixels[mine].to(device), "labels": labels[mine].to(device)}, len(labels[mine]))
            return
        if order is None:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_rows)
        size = min(size, len(order))
        for step in range(len(order) // size):
            rows = np.sort(runtime.share(order[step * size : (step + 1) * size]))
            features = torch.from_numpy(np.asarray(self.cache.features[rows], dtype=np.float32)).to(device)
            labels = torch.from_numpy(self.cache.labels[rows].astype(np.int64)).to(device)
            yield Batch({"features": features, "labels": labels}, len(rows))


def spread(count: int, limit: int | None) -> np.ndarray:
    """Positions of at most ``limit`` of ``count`` items, evenly spread (all when under it)."""
    if limit is None or count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).astype(np.int64))


def repeated(
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]],
    repeat: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    pool_batches: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a photo stream in which each photo appears ``repeat`` times, mixed through a
    pool of a few batches so a photo's copies rarely share a batch (each is cropped anew)."""
    pool_pixels, pool_labels = [], []
    held = 0
    for pixels, labels in stream:
        times = repeat(labels, generator)
        pool_pixels.append(pixels.repeat_interleave(times, dim=0))
        pool_labels.append(labels.repeat_interleave(times))
        held += int(times.sum())
        while held >= pool_batches * batch_size:
            pixels_all, labels_all = torch.cat(pool_pixels), torch.cat(pool_labels)
            order = torch.randperm(len(labels_all), generator=generator)
            take, keep = order[:batch_size], order[batch_size:]
            yield pixels_all[take], labels_all[take]
            pool_pixels, pool_labels, held = [pixels_all[keep]], [labels_all[keep]], len(keep)
    if held:
        pixels_all, labels_all = torch.cat(pool_pixels), torch.cat(pool_labels)
        order = torch.randperm(len(labels_all), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            take = order[start : start + batch_size]
            yield pixels_all[take], labels_all[take]
