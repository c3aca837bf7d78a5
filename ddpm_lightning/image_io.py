"""Writing sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image


MIN_TILE = 64


def grid_tensor(images_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> a float [C, H', W'] grid in [0, 1], as square as the count allows.

    Tiles smaller than 64 px (the 16x16 quickstart digits) are enlarged by pixel repetition, so the
    grid can be looked at; samples.npz keeps the true resolution.
    """
    images = torch.as_tensor(np.asarray(images_nhwc)).permute(0, 3, 1, 2).float() / 255.0
    scale = max(1, MIN_TILE // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return make_grid(images, nrow=max(1, math.isqrt(len(images))), padding=2, pad_value=1.0)


def save_grid(images_nhwc: np.ndarray | torch.Tensor, path: str | Path) -> None:
    """Save uint8 NHWC images as one PNG grid."""
    save_image(grid_tensor(images_nhwc), str(path))
