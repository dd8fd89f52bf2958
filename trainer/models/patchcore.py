"""PatchCore (Roth et al. 2022): nearest-neighbour distance to a coreset of normal patch features.

`PatchCore` is the pure, exportable module: raw uint8 frames in, image score and anomaly map
out, with ImageNet normalisation, the bank search and the smoothing all inside the graph.
`fit_patchcore` builds one from good images; `build_patchcore` restores a saved one. The
graph resizes every stage to a fixed patch grid, so it scores the trained input size only.
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
from ..coreset import DEFAULT_MAX_CANDIDATES, CoresetSpec, greedy_coreset
from ..errors import ModelError
from ..onnx_features import extract_features
from .base import ModelKind, TrainingImages, input_problems, restored
from .layers import ImageNetInput, blur, gaussian_kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PatchCoreConfig:
    """Everything that defines a PatchCore model; saved beside its weights and in the bundle."""

    input_height: int = 256
    input_width: int = 256
    channels: Literal[1, 3] = 3
    backbone: str = "efficientnet-lite0"
    stages: tuple[int, ...] = (3, 4)
    neighbourhood: int = 3
    coreset_ratio: float = 0.1
    max_bank_size: int = 4096
    max_bank_mb: float = 64.0
    bank_dtype: Literal["float32", "float16"] = "float32"
    projection_dim: int = 128
    blur_sigma: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [*self._architecture_problems(), *self._bank_problems()]
        if problems:
            raise ModelError("; ".join(problems))

    def _architecture_problems(self) -> list[str]:
        problems = input_problems(self)
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            problems.append(f"neighbourhood must be an odd number >= 1, got {self.neighbourhood}")
        if self.blur_sigma < 0:
            problems.append(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        return problems

    def _bank_problems(self) -> list[str]:
        problems = []
        if not 0.0 < self.coreset_ratio <= 1.0:
            problems.append(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.max_bank_size < 1 or self.max_bank_mb <= 0:
            problems.append(f"max_bank_size and max_bank_mb must be > 0, got {self.max_bank_size}, {self.max_bank_mb}")
        if self.bank_dtype not in ("float32", "float16"):
            problems.append(f"bank_dtype must be float32 or float16, got {self.bank_dtype!r}")
        return problems

    def bank_size_for(self, n_patches: int, feature_dim: int) -> int:
        """Bank size for n_patches training patches: the ratio, capped by count and by RAM."""
        bytes_per_patch = feature_dim * (2 if self.bank_dtype == "float16" else 4)
        ram_cap = int(self.max_bank_mb * 2**20 // bytes_per_patch)
        return max(1, min(n_patches, math.ceil(self.coreset_ratio * n_patches), self.max_bank_size, ram_cap))


class PatchEmbedder(nn.Module):
    """uint8 frames to locally aggregated multi-stage patch features.

    forward(images): (N, H, W, C) uint8 -> (N, D, H / 2**s0, W / 2**s0) float32, s0 = first stage.
    """

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__()
        self.features = EfficientNetLiteFeatures(config.backbone, config.stages)
        self.neighbourhood = config.neighbourhood
        self.input = ImageNetInput(config.channels)

    @property
    def feature_dim(self) -> int:
        return sum(self.features.channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(self.input(images))
        pad = self.neighbourhood // 2
        # Zero padding counts (as in PatchCore's unfold): border patches stay distinguishable by how many
        # neighbours they have, so they match border patches; averaging only the valid neighbours makes
        # them look like unusual interior patches, and the borders then dominate the image score.
        pooled = [F.avg_pool2d(m, self.neighbourhood, 1, pad, count_include_pad=True) for m in maps]
        size = pooled[0].shape[-2:]
        resized = [pooled[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in pooled[1:]]
        return torch.cat(resized, dim=1)


class PatchCore(nn.Module):
    """Scores frames against a memory bank of normal patches.

    forward(images): images (N, H, W, C) uint8 at the configured size ->
    (score (N,) float32 = max patch distance, anomaly_map (N, H, W) float32 smoothed distances).
    The search is a matrix product and a reduce-min (no gathers), cheap for ONNX and TensorRT.
    """

    config: PatchCoreConfig
    memory_bank: torch.Tensor  # buffers: (K, D), (K,), (taps,)
    bank_squared_norms: torch.Tensor
    blur_kernel: torch.Tensor

    def __init__(self, config: PatchCoreConfig, embedder: PatchEmbedder, memory_bank: torch.Tensor) -> None:
        super().__init__()
        if memory_bank.ndim != 2 or memory_bank.shape[1] != embedder.feature_dim:
            msg = f"memory bank must be (K, {embedder.feature_dim}), got {tuple(memory_bank.shape)}"
            raise ModelError(msg)
        self.config = config
        self.embedder = embedder
        bank_dtype = torch.float16 if config.bank_dtype == "float16" else torch.float32
        self.register_buffer("memory_bank", memory_bank.to(bank_dtype).contiguous())
        # Not saved: derived from the bank. Precomputed so the graph holds the bank once (as the
        # matrix product's operand) and does not recompute K norms for every frame.
        bank = self.memory_bank.float()
        self.register_buffer("bank_squared_norms", (bank * bank).sum(dim=1), persistent=False)
        self.register_buffer("blur_kernel", gaussian_kernel(config.blur_sigma))
        self.eval()

    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    def patch_distances(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) uint8 -> (N, 1, h, w) distance of each patch to its nearest bank entry."""
        features = self.embedder(images)
        n, d, h, w = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(n, h * w, d)
        squared = (
            (patches * patches).sum(dim=2, keepdim=True)
            - 2.0 * torch.matmul(patches, self.memory_bank.float().t())
            + self.bank_squared_norms.view(1, 1, -1)
        )
        nearest = squared.amin(dim=2).clamp(min=0.0).sqrt()
        return nearest.view(n, 1, h, w)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = self.patch_distances(images)
        scores = distances.flatten(1).amax(dim=1)
        size = (self.config.input_height, self.config.input_width)
        anomaly_map = F.interpolate(distances, size=size, mode="bilinear", align_corners=False)
        anomaly_map = blur(anomaly_map, self.blur_kernel)
        return scores, anomaly_map[:, 0]


def fit_patchcore(
    config: PatchCoreConfig, images: np.ndarray, *, batch_size: int = 16, progress: bool = False
) -> PatchCore:
    """Build a PatchCore from good images.

    images: (N, H, W, C) uint8 at the configured size and channel count.
    """
    expected = (config.input_height, config.input_width, config.channels)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8 or len(images) == 0:
        msg = f"training images must be (N, {', '.join(map(str, expected))}) uint8, got {images.shape} {images.dtype}"
        raise ModelError(msg)
    torch.manual_seed(config.seed)
    embedder = PatchEmbedder(config)
    features = extract_features(embedder, images, batch_size=batch_size, progress=progress)
    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    del features
    with torch.inference_mode():
        target = config.bank_size_for(patches.shape[0], embedder.feature_dim)
        spec = CoresetSpec(
            target_size=target,
            projection_dim=config.projection_dim,
            seed=config.seed,
            max_candidates=max(DEFAULT_MAX_CANDIDATES, target),
        )
        indices = greedy_coreset(patches, spec, progress=progress)
    log.info(
        "memory bank: %d of %d patches (%d dims, %s)", len(indices), len(patches), patches.shape[1], config.bank_dtype
    )
    return PatchCore(config, embedder, patches[indices].clone())


def build_patchcore(config: PatchCoreConfig, state: dict[str, torch.Tensor]) -> PatchCore:
    """Rebuild a fitted PatchCore from its config and state dict (the bank size comes from the state)."""
    bank = state.get("memory_bank")
    if bank is None:
        msg = "the saved PatchCore weights hold no memory_bank; refit the model"
        raise ModelError(msg)
    return restored(PatchCore(config, PatchEmbedder(config), bank.float()), state)  # bank norms derive at construction


def _fit(config: PatchCoreConfig, images: TrainingImages, progress: bool) -> PatchCore:
    return fit_patchcore(config, images.good, progress=progress)


def describe_patchcore(model: PatchCore) -> dict[str, object]:
    config = model.config
    return {
        "backbone": config.backbone,
        "stages": ", ".join(map(str, config.stages)),
        "memory bank": f"{model.bank_size} patches ({config.bank_dtype})",
    }


KIND = ModelKind(
    name="patchcore",
    config_type=PatchCoreConfig,
    fit=_fit,
    build=build_patchcore,
    describe=describe_patchcore,
    variable_size=False,
    summary="nearest-neighbour distance to a coreset of normal patch features; best with few images",
)
