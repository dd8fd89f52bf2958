"""FCDD (Liznerski et al. 2021): a fully convolutional one-class network with the hypersphere-classifier loss.

A small convolutional head over frozen ImageNet features maps every position to a pseudo-Huber
distance A = sqrt(phi^2 + 1) - 1 from the centre of normality. The hypersphere-classifier (HSC)
loss pulls good images' A towards 0 and pushes outliers' away, -log(1 - exp(-A)). Outliers
are synthetic (confetti noise of blobs and thin strokes, outlier exposure), whose extent is known, so the loss works per
map cell; and, when the train split holds them, a few labelled defects (semi-supervised) with
the image-level loss, since their masks are usually missing. The low-resolution map is upsampled with a fixed
Gaussian transposed convolution whose kernel spans a cell's receptive field (the paper's
receptive-field upsampling), normalised so borders are not darkened; the kernel is separable, so it
runs as two 1-D passes. Fully convolutional, so the graph scores any input size that is a multiple of 32.
The frozen backbone's features are extracted once per fit, in ONNX Runtime (trainer/onnx_features.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import EfficientNetLiteFeatures
from ..errors import ModelError
from ..onnx_features import extract_features, in_one_pass
from .base import (
    ModelKind,
    TrainingImages,
    check_training_size,
    input_problems,
    restored,
    schedule_problems,
    train_epochs,
    validation_auroc,
)
from .layers import ImageNetInput, hottest_pixels, mean_of_hottest
from .outliers import confetti_images

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FcddConfig:
    """Everything that defines an FCDD model; saved beside its weights and in the bundle."""

    input_height: int = 256
    input_width: int = 256
    channels: Literal[1, 3] = 3
    backbone: str = "efficientnet-lite0"
    stages: tuple[int, ...] = (3, 4)
    head_channels: int = 64
    outliers_per_image: float = 12.0
    epochs: int = 60
    patience: int = 12
    batch_size: int = 16
    learning_rate: float = 3e-4  # 1e-3 let the calibration AUROC jump by 0.1 between epochs on grey gravel
    weight_decay: float = 1e-6
    upsample_sigma: float = 8.0
    score_fraction: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        problems = input_problems(self) + schedule_problems(self)
        if self.head_channels < 1 or self.outliers_per_image <= 0 or self.upsample_sigma <= 0:
            problems.append("head_channels >= 1, outliers_per_image > 0 and upsample_sigma > 0 needed")
        if problems:
            raise ModelError("; ".join(problems))

    @property
    def stride(self) -> int:
        """Pixels per heatmap cell: the finest stage's stride."""
        return 2 ** self.stages[0]


def receptive_upsampling_kernel(stride: int, sigma: float) -> tuple[torch.Tensor, int]:
    """1-D transposed-convolution taps for a Gaussian spread of each cell over its pixels, and the padding.

    With K = stride + 2 * ceil(3 sigma) taps and padding ceil(3 sigma), a cell's value lands
    centred on the pixels it covers and fades with a Gaussian of sigma pixels around them.
    """
    radius = math.ceil(3 * sigma)
    taps = torch.arange(stride + 2 * radius, dtype=torch.float32) - radius - (stride - 1) / 2
    return torch.exp(-(taps**2) / (2 * sigma**2)), radius


class Fcdd(nn.Module):
    """Scores frames by a learnt distance map from normality.

    forward(images): (N, H, W, C) uint8, H and W multiples of 32 ->
    (score (N,) float32 = mean of the hottest score_fraction of the upsampled map's pixels,
    anomaly_map (N, H, W) float32 = the map upsampled to the input).
    The paper scores the mean of the whole map, which lets a small defect drown in a large
    good image; the hottest pixels keep it visible (test AUROC 0.85 -> 0.87 on sample gravel).
    """

    config: FcddConfig
    # Buffers: feature statistics (1, C, 1, 1) saved with the weights; the upsampling taps (1, 1, K, 1) and
    # (1, 1, 1, K), derived from the config.
    feature_mean: torch.Tensor
    feature_inv_std: torch.Tensor
    upsample_rows: torch.Tensor
    upsample_columns: torch.Tensor

    def __init__(self, config: FcddConfig) -> None:
        super().__init__()
        self.config = config
        self.input = ImageNetInput(config.channels)
        self.features = EfficientNetLiteFeatures(config.backbone, config.stages)
        in_channels = sum(self.features.channels)
        self.register_buffer("feature_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("feature_inv_std", torch.ones(1, in_channels, 1, 1))
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, config.head_channels, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(config.head_channels, 1, 1),
        )
        taps, self.upsample_padding = receptive_upsampling_kernel(config.stride, config.upsample_sigma)
        # The 2-D kernel is taps x taps: two 1-D passes (2K taps per cell instead of K^2), not saved with the weights.
        self.register_buffer("upsample_rows", taps.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("upsample_columns", taps.view(1, 1, 1, -1), persistent=False)
        self.score_pixels = hottest_pixels(config.input_height, config.input_width, config.score_fraction)
        self.eval()

    def stacked_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) uint8 -> (N, sum C_s, H / stride, W / stride): stages upsampled to the finest, raw."""
        maps = self.features(self.input(images))
        first = self.config.stages[0]
        resized = [maps[0]] + [
            F.interpolate(m, scale_factor=float(2 ** (stage - first)), mode="bilinear", align_corners=False)
            for m, stage in zip(maps[1:], self.config.stages[1:], strict=True)
        ]
        return torch.cat(resized, dim=1)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Raw stacked features -> pseudo-Huber distances A (N, 1, h, w) >= 0."""
        phi = self.head((features - self.feature_mean) * self.feature_inv_std)
        return torch.sqrt(phi * phi + 1.0) - 1.0

    def upsample(self, distances: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) -> (N, 1, h * stride, w * stride) by the Gaussian transposed convolution, border-normalised."""
        return self._spread(distances) / self._spread(torch.ones_like(distances))

    def _spread(self, cells: torch.Tensor) -> torch.Tensor:
        """The Gaussian transposed convolution, rows then columns."""
        stride, padding = self.config.stride, self.upsample_padding
        rows = F.conv_transpose2d(cells, self.upsample_rows, stride=(stride, 1), padding=(padding, 0))
        return F.conv_transpose2d(rows, self.upsample_columns, stride=(1, stride), padding=(0, padding))

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Raw stacked features -> (N,) image scores, as forward scores frames."""
        return mean_of_hottest(self.upsample(self.distances(features)), self.score_pixels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = self.distances(self.stacked_features(images))
        anomaly_map = self.upsample(distances)
        return mean_of_hottest(anomaly_map, self.score_pixels), anomaly_map[:, 0]


def _pushed_away(distance: torch.Tensor) -> torch.Tensor:
    """-log(1 - exp(-distance)): large near the centre, -> 0 far from it."""
    return -torch.log((-torch.expm1(-distance)).clamp(min=1e-6))


def hsc_loss(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-level hypersphere-classifier loss of (N, 1, h, w) distances and (N,) labels (0 good, 1 outlier)."""
    mean_distance = distances.flatten(1).mean(dim=1)
    return torch.where(labels > 0, _pushed_away(mean_distance), mean_distance).mean()


def pixel_hsc_loss(distances: torch.Tensor, cell_labels: torch.Tensor) -> torch.Tensor:
    """Cell-level HSC loss for outliers whose extent is known: (N, 1, h, w) distances and anomalous shares in [0, 1].

    Normal and anomalous cells are averaged separately and then added, so a blob that covers
    a few cells weighs as much as the many normal cells around it.
    """
    normal = 1.0 - cell_labels
    normal_term = (normal * distances).sum() / normal.sum().clamp(min=1e-6)
    anomalous_term = (cell_labels * _pushed_away(distances)).sum() / cell_labels.sum().clamp(min=1e-6)
    return normal_term + anomalous_term


class _StackedFeatures(nn.Module):
    """The frozen part of an FCDD as a module of its own, so ONNX Runtime can run it at fit time."""

    def __init__(self, model: Fcdd) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.stacked_features(images)


def _extract(model: Fcdd, *image_sets: np.ndarray | None, progress: bool) -> list[torch.Tensor | None]:
    """Stacked raw features of each image set (None stays None), from one ONNX Runtime session."""
    module = _StackedFeatures(model)
    return in_one_pass(lambda images: extract_features(module, images, progress=progress), *image_sets)


def fit_fcdd(config: FcddConfig, images: TrainingImages, *, progress: bool = False) -> Fcdd:
    """Train the head with the HSC loss on good images against confetti outliers and any labelled defects.

    The backbone is frozen: features of good images, outliers and validation images are
    extracted once, and each epoch trains the head alone on balanced batches.
    """
    check_training_size(config, images)
    torch.manual_seed(config.seed)
    model = Fcdd(config)
    n_synthetic = max(1, round(config.outliers_per_image * len(images.good)))
    synthetic, masks = confetti_images(images.good, n_synthetic, seed=config.seed)
    good, outliers, defects, validation = _extract(
        model, images.good, synthetic, images.defects, images.validation, progress=progress
    )
    assert good is not None and outliers is not None
    model.feature_mean.copy_(good.mean(dim=(0, 2, 3), keepdim=True))
    model.feature_inv_std.copy_(1.0 / good.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6))
    features = torch.cat([good, outliers])
    cell_masks = F.avg_pool2d(torch.from_numpy(masks)[:, None], config.stride)
    cell_labels = torch.cat([torch.zeros(len(good), *cell_masks.shape[1:]), cell_masks])

    def batch_loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        loss = pixel_hsc_loss(model.distances(features[batch]), cell_labels[batch])
        if defects is not None:  # labelled defects without masks: the image-level loss
            pick = torch.randint(len(defects), (min(len(defects), len(batch)),), generator=generator)
            loss = loss + hsc_loss(model.distances(defects[pick]), torch.ones(len(pick)))
        return loss

    log.info(
        "fcdd: %d good, %d confetti, %d labelled defect images",
        len(good),
        n_synthetic,
        0 if defects is None else len(defects),
    )
    train_epochs(
        "fcdd",
        model,
        model.head,
        config,
        n_samples=len(features),
        batch_loss=batch_loss,
        validation_auroc=lambda: validation_auroc(model.score_features, validation, images.validation_labels),
        progress=progress,
    )
    return model.eval()


def build_fcdd(config: FcddConfig, state: dict[str, torch.Tensor]) -> Fcdd:
    """Rebuild a fitted FCDD from its config and state dict."""
    # Models saved before the upsampling became separable also hold its 2-D kernel, which the config defines.
    state = {name: value for name, value in state.items() if name != "upsample_kernel"}
    return restored(Fcdd(config), state)


def describe_fcdd(model: Fcdd) -> dict[str, object]:
    config = model.config
    parameters = sum(p.numel() for p in model.head.parameters())
    return {
        "backbone": config.backbone,
        "stages": ", ".join(map(str, config.stages)),
        "head": f"{config.head_channels} channels, {parameters / 1e3:.0f} k parameters; map cell {config.stride} px",
        "outlier exposure": f"confetti noise (blobs and strokes), {config.outliers_per_image:g} per good image",
    }


KIND = ModelKind(
    name="fcdd",
    config_type=FcddConfig,
    fit=lambda config, images, progress: fit_fcdd(config, images, progress=progress),
    build=build_fcdd,
    describe=describe_fcdd,
    variable_size=True,
    uses_validation=True,
    uses_defects=True,
    summary="fully convolutional hypersphere classifier; lightest, any input size, can use a few labelled defects",
)
