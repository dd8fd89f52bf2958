"""Scores of one dataset split: the record that calibration, evaluation and the report share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class SplitScores:
    """A scored split, in dataset order.

    images: (N, H, W, C) uint8 at the model's input size, as the model saw them.
    labels: (N,) int64, 0 = ok (good), 1 = nok (defect).
    defect_types: the folder or CSV class of each image ("good" for ok images).
    scores: (N,) float32 image anomaly scores (higher = more anomalous).
    maps: (N, H, W) float32 anomaly maps at input resolution.
    masks: (N, H, W) bool ground truth, or None when the split has no masks;
        ok images and defects without a mask file count as all-False.
    """

    name: str
    paths: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    defect_types: tuple[str, ...]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None

    def __post_init__(self) -> None:
        n = len(self.paths)
        for field_name in ("images", "labels", "scores", "maps"):
            if len(getattr(self, field_name)) != n:
                msg = f"SplitScores.{field_name} has {len(getattr(self, field_name))} rows, expected {n}"
                raise ValueError(msg)
        if self.masks is not None and self.masks.shape != self.maps.shape:
            msg = f"SplitScores.masks shape {self.masks.shape} differs from maps {self.maps.shape}"
            raise ValueError(msg)

    @property
    def has_both_classes(self) -> bool:
        """True when the split holds ok and nok images (AUROC and F1 are defined)."""
        return bool(np.any(self.labels == 0) and np.any(self.labels == 1))


def score_images(model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Run a model over (N, H, W, C) uint8 images: (scores (N,) float32, maps (N, H, W) float32)."""
    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch_scores, batch_maps = model(torch.from_numpy(images[start : start + batch_size]))
            scores.append(batch_scores.numpy())
            maps.append(batch_maps.numpy())
    return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)


def save_split_scores(split: SplitScores, path: Path) -> None:
    """Write a scored split as an uncompressed .npz (plain arrays, loadable without pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "name": np.array(split.name),
        "paths": np.array(split.paths, dtype=str),
        "images": split.images,
        "labels": split.labels,
        "defect_types": np.array(split.defect_types, dtype=str),
        "scores": split.scores,
        "maps": split.maps,
    }
    if split.masks is not None:
        arrays["masks"] = split.masks
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # mypy cannot tell no key is savez's allow_pickle


def load_split_scores(path: Path) -> SplitScores:
    """Read a split written by save_split_scores."""
    with np.load(path, allow_pickle=False) as data:
        return SplitScores(
            name=str(data["name"]),
            paths=tuple(str(p) for p in data["paths"]),
            images=data["images"],
            labels=data["labels"],
            defect_types=tuple(str(t) for t in data["defect_types"]),
            scores=data["scores"],
            maps=data["maps"],
            masks=data["masks"] if "masks" in data.files else None,
        )
