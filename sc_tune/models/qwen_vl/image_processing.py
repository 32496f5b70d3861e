"""Qwen-VL's image preprocessing: bicubic resize to a square, scale to [0, 1], CLIP mean/std.

The official ``visual.py`` does this with torchvision inside every forward pass, from image paths. Here it
runs once per sample with PIL and torch only (no module named ``torchvision``: transformers would then
believe torchvision is installed, see docs/qwen_vl_remote_code.md, "torchvision"). PIL's bicubic resize is
what torchvision's ``Resize`` calls for PIL images, so the pixels are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QWenVLImageProcessor:
    """Callable: PIL image(s) -> float32 pixels ``(N, 3, image_size, image_size)``."""

    def __init__(self, image_size: int = 448, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @classmethod
    def from_config(cls, config) -> QWenVLImageProcessor:
        return cls(image_size=int(config.visual["image_size"]))

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Qwen-VL image processor expects PIL images, got {type(image).__name__}")
        resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels_HW3 = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
        pixels_3HW = pixels_HW3.permute(2, 0, 1).to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels_3HW - mean) / std

    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.preprocess_one(im) for im in images], dim=0)
