"""FastFlow (Yu et al. 2021): a 2-D normalising flow over frozen backbone feature maps.

Each backbone stage gets its own flow of affine coupling blocks whose subnets alternate 3x3 and
1x1 convolutions, so every position's likelihood depends on its neighbourhood. Trained by
maximum likelihood on good features; a position's anomaly is its negative log-likelihood per
feature dimension (Gaussian term plus the flow's log-determinant), upsampled, averaged over
stages and smoothed. Everything is convolutional and upsamples by fixed factors, so the graph
scores any input size that is a multiple of 32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import EfficientNetLiteFeatures
from ..errors import ModelError
from ..onnx_features import extract_feature_maps, in_one_pass
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
from .layers import ImageNetInput, blur, gaussian_kernel, hottest_pixels, mean_of_hottest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FastFlowConfig:
    """Everything that defines a FastFlow model; saved beside its weights and in the bundle."""

    input_height: int = 256
    input_width: int = 256
    channels: Literal[1, 3] = 3
    backbone: str = "efficientnet-lite0"
    stages: tuple[int, ...] = (3, 4)
    flow_steps: int = 8
    hidden_ratio: float = 0.5
    clamp: float = 2.0
    epochs: int = 40
    patience: int = 8
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    blur_sigma: float = 4.0
    score_fraction: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        problems = input_problems(self) + schedule_problems(self)
        if self.flow_steps < 1 or self.hidden_ratio <= 0 or self.clamp <= 0:
            problems.append(
                f"flow_steps >= 1, hidden_ratio > 0 and clamp > 0 needed, got {self.flow_steps}, {self.hidden_ratio}, {self.clamp}"
            )
        if self.blur_sigma < 0:
            problems.append(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if problems:
            raise ModelError("; ".join(problems))


class AffineCoupling(nn.Module):
    """One flow step: the second half of the channels is scaled and shifted by a function of the first.

    forward(x): (N, C, H, W) -> (y (N, C, H, W), log|det J| per position (N, H, W)).
    The scale is soft-clamped (clamp * tanh(s / clamp)) so training cannot blow it up, and the
    subnet's last layer starts at zero, so a fresh flow is the identity.
    """

    def __init__(self, channels: int, hidden: int, kernel: int, clamp: float) -> None:
        super().__init__()
        self.split = channels // 2
        passive, active = self.split, channels - self.split
        self.clamp = clamp
        self.subnet = nn.Sequential(
            nn.Conv2d(passive, hidden, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * active, kernel, padding=kernel // 2),
        )
        for parameter in self.subnet[-1].parameters():  # the last layer's weight and bias
            nn.init.zeros_(parameter)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        passive, active = x[:, : self.split], x[:, self.split :]
        log_scale, shift = self.subnet(passive).chunk(2, dim=1)
        log_scale = self.clamp * torch.tanh(log_scale / self.clamp)
        return torch.cat([passive, active * torch.exp(log_scale) + shift], dim=1), log_scale.sum(dim=1)


class FeatureFlow(nn.Module):
    """Coupling steps with fixed channel permutations between them, 3x3 and 1x1 subnets alternating.

    forward(x): (N, C, H, W) standardised features -> negative log-likelihood per dimension (N, 1, H, W).
    """

    def __init__(self, channels: int, config: FastFlowConfig, generator: torch.Generator) -> None:
        super().__init__()
        hidden = max(1, round(channels * config.hidden_ratio))
        self.channels = channels
        self.steps = nn.ModuleList(
            AffineCoupling(channels, hidden, 3 if step % 2 == 0 else 1, config.clamp)
            for step in range(config.flow_steps)
        )
        for step in range(config.flow_steps):
            self.register_buffer(f"permutation_{step}", torch.randperm(channels, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_det = torch.zeros_like(x[:, 0])
        for index, step in enumerate(self.steps):
            x, step_log_det = step(x)
            log_det = log_det + step_log_det
            x = x.index_select(1, getattr(self, f"permutation_{index}"))
        nll = 0.5 * (x * x).sum(dim=1) - log_det
        return (nll / self.channels).unsqueeze(1)


class FastFlow(nn.Module):
    """Scores frames by the likelihood of their backbone features under flows fitted to good images.

    forward(images): (N, H, W, C) uint8, H and W multiples of 32 ->
    (score (N,) float32 = mean of the hottest score_fraction of the map's pixels, anomaly_map (N, H, W) float32).
    """

    config: FastFlowConfig
    blur_kernel: torch.Tensor  # buffer, (taps,)

    def __init__(self, config: FastFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input = ImageNetInput(config.channels)
        self.features = EfficientNetLiteFeatures(config.backbone, config.stages)
        generator = torch.Generator().manual_seed(config.seed)
        self.flows = nn.ModuleList(FeatureFlow(c, config, generator) for c in self.features.channels)
        for index, c in enumerate(self.features.channels):
            self.register_buffer(f"feature_mean_{index}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"feature_inv_std_{index}", torch.ones(1, c, 1, 1))
        self.register_buffer("blur_kernel", gaussian_kernel(config.blur_sigma))
        self.score_pixels = hottest_pixels(config.input_height, config.input_width, config.score_fraction)
        self.eval()

    def standardised_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, H, W, C) uint8 -> one (N, C_s, H / 2**s, W / 2**s) map per stage, standardised per channel."""
        return self.standardise(self.features(self.input(images)))

    def standardise(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw stage features -> zero mean, unit variance per channel (training statistics)."""
        return [
            (f - getattr(self, f"feature_mean_{i}")) * getattr(self, f"feature_inv_std_{i}")
            for i, f in enumerate(features)
        ]

    def set_feature_statistics(self, features: list[torch.Tensor]) -> None:
        """Per-channel mean and std of the training features, one (N, C, h, w) tensor per stage."""
        for index, stage_features in enumerate(features):
            mean = stage_features.mean(dim=(0, 2, 3), keepdim=True)
            std = stage_features.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
            getattr(self, f"feature_mean_{index}").copy_(mean)
            getattr(self, f"feature_inv_std_{index}").copy_(1.0 / std)

    def stage_nll(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standardised stage features -> one (N, 1, h_s, w_s) NLL-per-dimension map per stage."""
        return [flow(f) for flow, f in zip(self.flows, features, strict=True)]

    def anomaly_maps(self, nll: list[torch.Tensor]) -> torch.Tensor:
        """Per-stage NLL maps -> (N, 1, H, W): upsampled by each stage's stride, averaged, smoothed."""
        upsampled = [
            F.interpolate(m, scale_factor=float(2**stage), mode="bilinear", align_corners=False)
            for m, stage in zip(nll, self.config.stages, strict=True)
        ]
        return blur(torch.stack(upsampled).mean(dim=0), self.blur_kernel)

    def score_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Standardised stage features -> (N,) image scores, as forward scores frames."""
        return mean_of_hottest(self.anomaly_maps(self.stage_nll(features)), self.score_pixels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = self.anomaly_maps(self.stage_nll(self.standardised_features(images)))
        return mean_of_hottest(anomaly_map, self.score_pixels), anomaly_map[:, 0]


class _RawFeatures(nn.Module):
    """The frozen part of a FastFlow as a module of its own, so ONNX Runtime can run it at fit time."""

    def __init__(self, model: FastFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.features(self.model.input(images))


def _extract(model: FastFlow, images: np.ndarray, *, progress: bool = False) -> list[torch.Tensor]:
    """Raw (unstandardised) backbone features of all images, one (N, C, h, w) tensor per stage."""
    return extract_feature_maps(_RawFeatures(model), images, progress=progress)


def fit_fastflow(config: FastFlowConfig, images: TrainingImages, *, progress: bool = False) -> FastFlow:
    """Train the flows on the good images' features; keep the epoch with the best calibration AUROC.

    The backbone is frozen, so features are extracted once and every epoch trains the flows alone.
    """
    check_training_size(config, images)
    torch.manual_seed(config.seed)
    model = FastFlow(config)
    train_features, validation_features = in_one_pass(
        lambda batch: _extract(model, batch, progress=progress), images.good, images.validation
    )
    model.set_feature_statistics(train_features)
    train_features = model.standardise(train_features)
    validation = model.standardise(validation_features) if validation_features is not None else None

    def batch_loss(batch: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        return torch.stack([m.mean() for m in model.stage_nll([f[batch] for f in train_features])]).mean()

    train_epochs(
        "fastflow",
        model,
        model.flows,
        config,
        n_samples=len(images.good),
        batch_loss=batch_loss,
        validation_auroc=lambda: validation_auroc(model.score_features, validation, images.validation_labels),
        progress=progress,
        clip_grad_norm=1.0,
    )
    return model.eval()


def build_fastflow(config: FastFlowConfig, state: dict[str, torch.Tensor]) -> FastFlow:
    """Rebuild a fitted FastFlow from its config and state dict."""
    return restored(FastFlow(config), state)


def describe_fastflow(model: FastFlow) -> dict[str, object]:
    config = model.config
    parameters = sum(p.numel() for p in model.flows.parameters())
    return {
        "backbone": config.backbone,
        "stages": ", ".join(map(str, config.stages)),
        "flow": f"{config.flow_steps} coupling steps per stage, {parameters / 1e6:.2f} M parameters",
    }


KIND = ModelKind(
    name="fastflow",
    config_type=FastFlowConfig,
    fit=lambda config, images, progress: fit_fastflow(config, images, progress=progress),
    build=build_fastflow,
    describe=describe_fastflow,
    variable_size=True,
    uses_validation=True,
    summary="normalising flow over feature maps; fast, any input size",
)
