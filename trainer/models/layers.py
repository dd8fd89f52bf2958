"""Graph pieces the models share: uint8 frames to backbone input, and Gaussian smoothing of maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB


class ImageNetInput(nn.Module):
    """(N, H, W, C) uint8 frames -> (N, 3, H, W) float32 ImageNet-normalised RGB; grey frames are repeated."""

    mean: torch.Tensor  # buffers, (1, 3, 1, 1)
    inv_std: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1) * 255.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) * self.inv_std


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian taps, (K,), K = 2 * ceil(4 sigma) + 1; a single 1.0 when sigma is 0."""
    if sigma == 0:
        return torch.ones(1)
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) maps with reflected borders."""
    radius = kernel.shape[0] // 2
    if radius == 0:
        return maps
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def hottest_pixels(height: int, width: int, fraction: float, *, cap: int = 1024) -> int:
    """How many map pixels the image score averages: fraction of the trained size, 1..cap.

    The count stays fixed when a variable-size graph sees another size: a defect's area in
    pixels does not grow with the frame. The cap keeps ONNX TopK within TensorRT's limits.
    """
    return max(1, min(cap, round(fraction * height * width)))


def mean_of_hottest(maps: torch.Tensor, count: int) -> torch.Tensor:
    """(N, 1, H, W) maps -> (N,) mean of each map's `count` highest values: a max that one hot pixel cannot make."""
    return maps.flatten(1).topk(count, dim=1).values.mean(dim=1)
