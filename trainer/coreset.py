"""Greedy k-center coreset selection for PatchCore's memory bank.

The greedy rule (Sener & Savarese 2018, as used by PatchCore) repeatedly adds the feature that
is farthest from everything chosen so far, so the bank covers rare normal patches that random
sampling would miss. Only (N,) running vectors are kept: never an N x N matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoresetSpec:
    """How large the bank may grow and how selection runs.

    target_size: patches to keep (the final bank size is min(target_size, N)).
    projection_dim: features are randomly projected to this many dimensions for the distance
        computations only (Johnson-Lindenstrauss); 0 keeps the full dimension.
    seed: seeds the projection and the first centre.
    """

    target_size: int
    projection_dim: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_size < 1:
            msg = f"coreset target_size must be >= 1, got {self.target_size}"
            raise ValueError(msg)
        if self.projection_dim < 0:
            msg = f"coreset projection_dim must be >= 0, got {self.projection_dim}"
            raise ValueError(msg)


def greedy_coreset(features: torch.Tensor, spec: CoresetSpec, *, progress: bool = False) -> torch.Tensor:
    """Return the indices of a greedy k-center coreset.

    features: (N, D) float. Returns (K,) int64 indices into features, in selection order,
    K = min(spec.target_size, N), all distinct. Cost: K passes over the (N, projection_dim)
    projected features, one fused matrix-vector product each.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        msg = f"features must be a non-empty (N, D) matrix, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    n = features.shape[0]
    k = min(spec.target_size, n)
    if k == n:
        return torch.arange(n, dtype=torch.int64)
    generator = torch.Generator().manual_seed(spec.seed)
    points = _project(features.float(), spec.projection_dim, generator)
    squared_norms = (points * points).sum(dim=1)

    selected = torch.empty(k, dtype=torch.int64)
    selected[0] = int(torch.randint(n, (1,), generator=generator).item())
    min_sq_dist = torch.empty(n)
    candidate = torch.empty(n)
    _squared_distances_to(points, squared_norms, int(selected[0]), out=min_sq_dist)
    min_sq_dist[selected[0]] = -1.0
    for i in tqdm(range(1, k), desc="coreset", unit="patch", disable=not progress, mininterval=1.0):
        farthest = int(torch.argmax(min_sq_dist))
        selected[i] = farthest
        torch.minimum(
            min_sq_dist, _squared_distances_to(points, squared_norms, farthest, out=candidate), out=min_sq_dist
        )
        min_sq_dist[farthest] = -1.0  # never chosen twice, even when rounding leaves it a hair above 0
    return selected


def _project(features: torch.Tensor, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian random projection to projection_dim dimensions, or features as they are."""
    d = features.shape[1]
    if projection_dim == 0 or projection_dim >= d:
        return features.contiguous()
    matrix = torch.randn(d, projection_dim, generator=generator) / projection_dim**0.5
    return features @ matrix


def _squared_distances_to(
    points: torch.Tensor, squared_norms: torch.Tensor, index: int, *, out: torch.Tensor
) -> torch.Tensor:
    """||points - points[index]||^2 for every row into out (N,): |p|^2 - 2 p.c + |c|^2, fused."""
    torch.addmv(squared_norms, points, points[index], beta=1.0, alpha=-2.0, out=out)
    return out.add_(squared_norms[index])
