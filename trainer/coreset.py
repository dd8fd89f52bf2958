"""Greedy k-center coreset selection for PatchCore's memory bank.

The greedy rule (Sener & Savarese 2018, as used by PatchCore) repeatedly adds the feature that
is farthest from everything chosen so far, so the bank covers rare normal patches that random
sampling would miss. Only (N,) running vectors are kept: never an N x N matrix.

Each greedy step reads all N candidates, so the cost is K x N x dim and, on a CPU, bound by
memory bandwidth. Above `max_candidates` patches a first greedy pass runs inside chunks of
consecutive patches (an image's own, small enough to stay in cache) and keeps each chunk's
farthest-apart patches; the global pass then runs on those. This is a hierarchical k-center:
every patch lies within the first pass's radius of a candidate, and every candidate within the
second pass's radius of the bank, so rare patches survive while 500 images fit in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_MAX_CANDIDATES = 65536  # 32 MiB of 128-dim float32: one greedy pass stays fast


@dataclass(frozen=True, slots=True)
class CoresetSpec:
    """How large the bank may grow and how selection runs.

    target_size: patches to keep (the final bank size is min(target_size, N)).
    projection_dim: features are randomly projected to this many dimensions for the distance
        computations only (Johnson-Lindenstrauss); 0 keeps the full dimension.
    seed: seeds the projection and the first centre.
    max_candidates: above this many patches, a per-chunk greedy pass first keeps this many.
    chunk_size: patches per chunk in that first pass.
    """

    target_size: int
    projection_dim: int = 128
    seed: int = 0
    max_candidates: int = DEFAULT_MAX_CANDIDATES
    chunk_size: int = 8192

    def __post_init__(self) -> None:
        if self.target_size < 1:
            msg = f"coreset target_size must be >= 1, got {self.target_size}"
            raise ValueError(msg)
        if self.projection_dim < 0:
            msg = f"coreset projection_dim must be >= 0, got {self.projection_dim}"
            raise ValueError(msg)
        if self.max_candidates < self.target_size or self.chunk_size < 2:
            msg = f"coreset max_candidates ({self.max_candidates}) must be >= target_size ({self.target_size}), chunk_size >= 2"
            raise ValueError(msg)


def greedy_coreset(features: torch.Tensor, spec: CoresetSpec, *, progress: bool = False) -> torch.Tensor:
    """Return the indices of a greedy k-center coreset.

    features: (N, D) float. Returns (K,) int64 indices into features, in selection order,
    K = min(spec.target_size, N), all distinct. Cost: K passes over the (min(N, max_candidates),
    projection_dim) projected features, one fused matrix-vector product each.
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
    candidates = torch.arange(n, dtype=torch.int64)
    if n > spec.max_candidates:
        candidates = _chunk_candidates(points, spec, generator, progress=progress)
        points = points[candidates]
    chosen = _greedy(points, k, generator, progress=progress, label="coreset")
    return candidates[chosen]


def _chunk_candidates(
    points: torch.Tensor, spec: CoresetSpec, generator: torch.Generator, *, progress: bool
) -> torch.Tensor:
    """First pass: greedy inside each chunk, keeping max_candidates patches in all, (M,) indices."""
    n = points.shape[0]
    keep_ratio = spec.max_candidates / n
    kept = []
    starts = range(0, n, spec.chunk_size)
    for start in tqdm(starts, desc="coreset candidates", unit="chunk", disable=not progress, mininterval=1.0):
        chunk = points[start : start + spec.chunk_size]
        k = max(1, min(len(chunk), round(keep_ratio * len(chunk))))
        kept.append(_greedy(chunk, k, generator, progress=False, label="") + start)
    return torch.cat(kept)


def _greedy(points: torch.Tensor, k: int, generator: torch.Generator, *, progress: bool, label: str) -> torch.Tensor:
    """Plain greedy k-center over points (N, d): (k,) distinct indices in selection order."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    squared_norms = (points * points).sum(dim=1)
    selected = torch.empty(k, dtype=torch.int64)
    selected[0] = int(torch.randint(n, (1,), generator=generator).item())
    min_sq_dist = torch.empty(n)
    candidate = torch.empty(n)
    _squared_distances_to(points, squared_norms, int(selected[0]), out=min_sq_dist)
    min_sq_dist[selected[0]] = -1.0
    for i in tqdm(range(1, k), desc=label, unit="patch", disable=not progress, mininterval=1.0):
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
