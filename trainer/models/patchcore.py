"""PatchCore (Roth et al. 2022): nearest-neighbour distance to a coreset of normal patch features.

`PatchCore` is the pure, exportable module: raw uint8 frames in, image score and anomaly map
out, with ImageNet normalisation, the bank search and the smoothing all inside the graph.
`fit_patchcore` builds one from good images; `build_patchcore` restores a saved one. The
graph resizes every stage to a fixed patch grid, so it scores the trained input size only.
"""

from __future__ import annotations

import itertools
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

REGION_MARGIN = 2  # patch cells a region's bank reaches past its block: tolerance for parts a little off position


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
    regions: int = 1
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
        grid = (self.input_height >> min(self.stages, default=3), self.input_width >> min(self.stages, default=3))
        if self.regions < 1 or grid[0] % self.regions or grid[1] % self.regions:
            problems.append(
                f"regions must be >= 1 and divide the {grid[1]}x{grid[0]} patch grid of a "
                f"{self.input_width}x{self.input_height} input, got {self.regions}"
            )
        return problems

    @property
    def n_regions(self) -> int:
        """Position-aware banks: the patch grid is cut into regions x regions blocks, one bank each."""
        return self.regions * self.regions

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
        """Bank size (per region) for n_patches training patches (of that region): the ratio, capped by count and RAM."""
        bytes_per_patch = feature_dim * (2 if self.bank_dtype == "float16" else 4)
        ram_cap = int(self.max_bank_mb * 2**20 // bytes_per_patch) // self.n_regions
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
    With config.regions = R > 1 the bank holds R*R blocks of M entries, region-major: a patch is
    searched only against the block of its region of the patch grid (position-aware).
    """

    config: PatchCoreConfig
    memory_bank: torch.Tensor  # buffers: (K, D) with K = R*R*M, (R*R, D+1, M), (taps,)
    search_matrix: torch.Tensor
    blur_kernel: torch.Tensor

    def __init__(self, config: PatchCoreConfig, embedder: PatchEmbedder, memory_bank: torch.Tensor) -> None:
        super().__init__()
        if (
            memory_bank.ndim != 2
            or memory_bank.shape[1] != embedder.feature_dim
            or memory_bank.shape[0] % config.n_regions
        ):
            msg = (
                f"memory bank must be (K, {embedder.feature_dim}) with K a multiple of {config.n_regions} regions, "
                f"got {tuple(memory_bank.shape)}"
            )
            raise ModelError(msg)
        self.config = config
        self.embedder = embedder
        bank_dtype = torch.float16 if config.bank_dtype == "float16" else torch.float32
        self.register_buffer("memory_bank", memory_bank.to(bank_dtype).contiguous())
        # Not saved: derived from the bank. The graph holds it (and not the bank) as its one constant.
        self.register_buffer("search_matrix", search_matrix(self.memory_bank, config.regions), persistent=False)
        self.register_buffer("blur_kernel", gaussian_kernel(config.blur_sigma))
        self.eval()

    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    def patch_distances(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) uint8 -> (N, 1, h, w) distance of each patch to its nearest bank entry (of its region).

        |p - b|^2 = |p|^2 + (|b|^2 - 2 p.b): the bracket, for every entry at once, is one matrix product
        of the patch with a 1 appended and the search matrix; |p|^2 is added after the min, per patch.
        """
        features = self.embedder(images)
        r = self.config.regions
        patches = to_regions(features, r)  # (N, R*R, P, D)
        inner = torch.matmul(F.pad(patches, (0, 1), value=1.0), self.search_matrix)  # (N, R*R, P, M)
        squared = inner.amin(dim=3) + (patches * patches).sum(dim=3)
        nearest = squared.clamp(min=0.0).sqrt()  # (N, R*R, P)
        return from_regions(nearest, r, features.shape[2], features.shape[3])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = self.patch_distances(images)
        scores = distances.flatten(1).amax(dim=1)
        size = (self.config.input_height, self.config.input_width)
        anomaly_map = F.interpolate(distances, size=size, mode="bilinear", align_corners=False)
        anomaly_map = blur(anomaly_map, self.blur_kernel)
        return scores, anomaly_map[:, 0]


def search_matrix(memory_bank: torch.Tensor, regions: int) -> torch.Tensor:
    """(K, D) bank, R*R blocks of M entries -> (R*R, D+1, M) float32: each block's -2 b columns over its |b|^2 row.

    The graph holds the bank once, as this matrix (ONNX Runtime and TensorRT run the search as one
    matrix product, with no full-size add). A float16 bank keeps its |b|^2 at float16 too, so every
    value is an exact half and the export still stores the matrix at half size (store_exact_halves);
    a float16 bank whose squared norms overflow float16 is refused.
    """
    bank = memory_bank.float().view(regions * regions, -1, memory_bank.shape[1])  # (R*R, M, D)
    norms = (bank * bank).sum(dim=2, keepdim=True)  # (R*R, M, 1)
    if memory_bank.dtype == torch.float16:
        largest = float(norms.max())
        if largest > torch.finfo(torch.float16).max:
            msg = f"a bank entry's squared norm {largest:.4g} exceeds float16's range: use bank_dtype float32"
            raise ModelError(msg)
        norms = norms.half().float()
    return torch.cat([-2.0 * bank, norms], dim=2).transpose(1, 2).contiguous()


def to_regions(features: torch.Tensor, regions: int) -> torch.Tensor:
    """(N, D, h, w) -> (N, R*R, P, D): the patches of each of R x R grid blocks, row-major; P = (h / R) * (w / R)."""
    n, d, h, w = features.shape
    if regions == 1:  # the same, as a 4-D transpose: ONNX Runtime runs the 6-D one several times slower
        return features.permute(0, 2, 3, 1).reshape(n, 1, h * w, d)
    blocks = features.reshape(n, d, regions, h // regions, regions, w // regions)
    return blocks.permute(0, 2, 4, 3, 5, 1).reshape(n, regions * regions, -1, d)


def from_regions(values: torch.Tensor, regions: int, h: int, w: int) -> torch.Tensor:
    """(N, R*R, P) per-region patch values -> (N, 1, h, w): the inverse of to_regions for one channel."""
    n = values.shape[0]
    if regions == 1:
        return values.reshape(n, 1, h, w)
    blocks = values.reshape(n, regions, regions, h // regions, w // regions)
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, 1, h, w)


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
    with torch.inference_mode():
        bank = select_bank(config, features, progress=progress)
    return PatchCore(config, embedder, bank)


def select_bank(config: PatchCoreConfig, features: torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """The memory bank from training features (N, D, h, w): (K, D), one coreset per region, region-major.

    Each region's coreset is drawn from its block of the patch grid grown by REGION_MARGIN cells,
    so a part that sits a little off its fixture still finds its patches in its own block.
    """
    n, d, h, w = features.shape
    r = config.regions
    block_h, block_w = h // r, w // r
    target = config.bank_size_for(n * block_h * block_w, d)
    margin = REGION_MARGIN if r > 1 else 0
    blocks = []
    for row, col in itertools.product(range(r), range(r)):
        rows = slice(max(0, row * block_h - margin), (row + 1) * block_h + margin)
        cols = slice(max(0, col * block_w - margin), (col + 1) * block_w + margin)
        patches = features[:, :, rows, cols].permute(0, 2, 3, 1).reshape(-1, d)
        spec = CoresetSpec(
            target_size=target,
            projection_dim=config.projection_dim,
            seed=config.seed,
            max_candidates=max(DEFAULT_MAX_CANDIDATES, target),
        )
        blocks.append(patches[greedy_coreset(patches, spec, progress=progress and r == 1)].clone())
    log.info(
        "memory bank: %d region(s) x %d of %d patches (%d dims, %s)", r * r, target, n * h * w, d, config.bank_dtype
    )
    return torch.cat(blocks)


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
        "position-aware regions": "off" if config.regions == 1 else f"{config.regions}x{config.regions}",
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
