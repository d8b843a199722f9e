"""An image tower cut in two: the frozen lower part runs once over the data (its activations are
cached like image features), the upper part trains on them. The same idea as the feature cache,
one level down: with the lower blocks locked and no augmentation, their output never changes.

Supported: timm's EfficientNet / MobileNet family (``conv_stem``, ``bn1``, ``blocks`` of stages,
``conv_head``, ``bn2``, ``global_pool``), which covers the offline EfficientNet-Lite towers.
"""

from __future__ import annotations

import torch
from torch import nn

from taxoclip.errors import TaxoclipError
from taxoclip.models.towers import ImageTower


def stages_of(tower: ImageTower) -> nn.Sequential:
    model = tower.model
    if not all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        raise TaxoclipError(
            f"{tower.name}: training its upper blocks on cached activations supports timm's EfficientNet/MobileNet "
            "family (efficientnet-lite0/1/2, timm:efficientnet_*, timm:mobilenetv*); use --depth head for this tower"
        )
    return model.blocks


class LowerPart(nn.Module):
    """Pixels -> the activation after stage ``cut`` (flattened, so the feature cache stores it)."""

    def __init__(self, tower: ImageTower, cut: int):
        super().__init__()
        model = tower.model
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.stages = nn.Sequential(*list(stages_of(tower))[:cut])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(pixels)).flatten(1)


class UpperPart(nn.Module):
    """Cached activations (flattened) -> the remaining stages, head convolution and pooling:
    the tower's pooled embedding."""

    def __init__(self, tower: ImageTower, cut: int, shape: tuple[int, int, int]):
        super().__init__()
        model = tower.model
        self.shape = shape
        self.stages = nn.Sequential(*list(stages_of(tower))[cut:])
        self.head = nn.Sequential(model.conv_head, model.bn2, model.global_pool)

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        x = activations.float().view(len(activations), *self.shape)
        return self.head(self.stages(x)).flatten(1)


def split_tower(tower: ImageTower, train_blocks: int) -> tuple[ImageTower, UpperPart]:
    """(an ImageTower whose "embedding" is the lower part's flattened activation, the upper part).
    The two share the tower's modules: training the upper part trains the tower itself."""
    stages = stages_of(tower)
    if not 1 <= train_blocks <= len(stages):
        raise TaxoclipError(
            f"--train-blocks {train_blocks}: {tower.name} has {len(stages)} stages; use 1 to {len(stages)}"
        )
    cut = len(stages) - train_blocks
    lower = LowerPart(tower, cut).eval()
    with torch.no_grad():
        probe = torch.zeros(1, 3, tower.preprocess.size, tower.preprocess.size)
        shape = tuple(lower.stages(lower.stem(probe)).shape[1:])
    width = int(torch.tensor(shape).prod())
    lower_tower = ImageTower(f"{tower.name}|lower:{cut}", lower, tower.preprocess, width)
    lower_tower.pretrained = getattr(tower, "pretrained", True)
    return lower_tower, UpperPart(tower, cut, shape)
