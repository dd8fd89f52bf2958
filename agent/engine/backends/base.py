"""The face every inference back end shows the engine loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from ...model_input import PixelFormat
from ...ring import ShmRing


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


@dataclass(frozen=True, slots=True)
class RingRegion:
    """One camera's frames as they lie in its ring, and the part of them the model sees.

    box: (x, y, width, height) of the ROI in frame pixels, checked against the frames already
    (agent/model_input.py). Equal only for the same ring object: a re-attached ring is a new region.
    """

    ring: ShmRing
    box: tuple[int, int, int, int]
    source_format: PixelFormat


class SlotAddress(NamedTuple):
    """One frame of a batch on the GPU frame path: the key its ring region was attached under, its slot's address."""

    key: str
    address: int


@runtime_checkable
class SlotBackend(Backend, Protocol):
    """A back end that also crops and resizes on its device, reading frames straight from their ring slots."""

    def attach_region(self, key: str, region: RingRegion) -> bool:
        """True when frames of `region` can go through infer_slots; False: preprocess them and call infer.

        Never blocks: a back end that must first prepare the region (build an engine) does so in the
        background and says False until it is ready.
        """
        ...

    def infer_slots(self, frames: Sequence[SlotAddress]) -> Inference:
        """N <= max_batch frames of attached regions, any mix and order -> scores in that order, maps on request."""
        ...
