"""Pixel preprocessing: a photo resized and centre-cropped to a tower's input as uint8 (in the
decoding workers), then normalised in batches where the tower runs. Each image tower carries one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from taxoclip.data.images import as_rgb


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to size / crop_pct, centre-crop ``size``, scale to [0, 1], normalise."""

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalise_pixels(self.to_uint8(image), self)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """The resized, cropped image as a uint8 CHW tensor (normalisation happens in batches)."""
        resize_to = round(self.size / self.crop_pct)
        if image.format == "JPEG" and min(image.size) >= 2 * resize_to:
            image.draft("RGB", (resize_to, resize_to))  # DCT-domain downscale: much faster for big photos
        image = as_rgb(image)  # upright, 8-bit RGB
        width, height = self.resized(image.width, image.height)
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[self.interpolation]
        image = image.resize((width, height), resample)
        left, top = (width - self.size) // 2, (height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a photo once its shorter side is size / crop_pct, before the crop."""
        scale = round(self.size / self.crop_pct) / min(width, height)
        return max(self.size, round(width * scale)), max(self.size, round(height * scale))


def normalise_pixels(pixels: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (…, 3, H, W) -> float, normalised as the tower expects."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1) * 255
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1) * 255
    return (pixels.float() - mean) / std
