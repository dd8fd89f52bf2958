"""The face every inference back end shows the engine loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BackendUnavailable(Exception):
    """A back end cannot run here (library or device missing); the message says what to install."""


@dataclass(frozen=True, slots=True)
class Inference:
    """One batch's outputs: the scores at once, anomaly maps only for the rows asked for.

    scores: (N,) float32. A GPU back end keeps the maps on the device until `maps` copies the
    requested rows back, so accepted frames whose maps nobody looks at cost no transfer.
    """

    scores: np.ndarray
    fetch_maps: Callable[[Sequence[int]], np.ndarray]

    def maps(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), H, W) float32 maps of the given batch rows; valid until the back end's next infer()."""
        return self.fetch_maps(rows)


class Backend(Protocol):
    """Runs one model graph: (N, H, W, C) uint8 frames -> Inference."""

    name: str
    detail: str  # what it actually runs on, e.g. the provider list or the engine file, for logs and status

    def infer(self, frames: np.ndarray) -> Inference: ...

    def close(self) -> None: ...
