"""Photos streamed from shards, for trainers whose image tower runs inside the step (LiT's
image-in-loop and unlocked tower, CatLIP's whole-tower depth): global batches of decoded photos,
optional augmentation, and the tower's embeddings of a whole split for evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from taxoclip.data.features import image_loader, plan_from_shards
from taxoclip.data.preprocess import Preprocess


class ShardBatches:
    """Global batches of decoded photos (uint8) and their labels from one split of the shards, in
    a shuffled unit order per epoch. Every rank decodes the whole global batch and keeps its share
    (the tower's forward, not decoding, is what sharing saves)."""

    def __init__(
        self,
        shards: str | Path,
        preprocess: Preprocess,
        batch_size: int,
        split: str = "train",
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        keep: Callable[[str], bool] | None = None,
    ):
        self.plan = plan_from_shards(Path(shards), split)
        self.preprocess, self.batch_size, self.augment, self.keep = preprocess, batch_size, augment, keep

    @property
    def count(self) -> int:
        return sum(unit.count for unit in self.plan.units)

    def epoch(self, epoch: int, held_out: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        units = list(self.plan.units)
        np.random.default_rng(epoch).shuffle(units)
        generator = torch.Generator().manual_seed(10_007 * (epoch + 1))  # the same crops on every rank
        loader = image_loader(units, self.preprocess, self.batch_size, torch.device("cpu"), keep=self.keep)
        excluded = set(held_out.tolist())
        for batch in loader:
            keep = [i for i, item in enumerate(batch["good"]) if item["label"] not in excluded]
            if not keep:
                continue
            labels = torch.tensor([batch["good"][i]["label"] for i in keep])
            pixels = batch["pixels"][keep]
            yield (self.augment(pixels, generator) if self.augment else pixels), labels


def crop_and_flip(pixels: torch.Tensor, generator: torch.Generator, min_scale: float = 0.35) -> torch.Tensor:
    """Random-resized-crop (area min_scale..1, aspect 3/4..4/3) and horizontal flip of each uint8
    photo (B, 3, S, S), back to S x S: the usual augmentation for training an image tower."""
    size = pixels.shape[-1]
    out = torch.empty_like(pixels)
    for i, image in enumerate(pixels):
        area = size * size * float(torch.empty(1).uniform_(min_scale, 1.0, generator=generator))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
        w = min(size, round(math.sqrt(area * ratio)))
        h = min(size, round(math.sqrt(area / ratio)))
        top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
        crop = image[:, top : top + h, left : left + w].float().unsqueeze(0)
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        if bool(torch.rand(1, generator=generator) < 0.5):
            resized = resized.flip(-1)
        out[i] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


@torch.no_grad()
def embed_split(
    shards: str | Path, tower, split: str, keep: Callable[[str], bool] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current image tower's embeddings of one split's photos (those ``keep`` picks), and their
    labels, in the feature cache's row order (unreadable photos skipped, as the cache skips them)."""
    plan = plan_from_shards(Path(shards), split)
    device = next(tower.parameters()).device
    loader = image_loader(plan.units, tower.preprocess, 64, device, keep=keep)
    was_training = tower.training
    tower.eval()
    features, labels = [], []
    for batch in loader:
        if batch["pixels"] is not None:
            features.append(tower.embed(batch["pixels"].to(device)).cpu())
            labels.extend(item["label"] for item in batch["good"])
    tower.train(was_training)
    if not features:
        return torch.zeros(0, tower.width), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.tensor(labels)
