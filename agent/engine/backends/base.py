"""The face every inference back end shows the engine loop."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailable(Exception):
    """A back end cannot run here (library or device missing); the message says what to install."""


class Backend(Protocol):
    """Runs one model graph: (N, H, W, C) uint8 frames -> (scores (N,), maps (N, H, W)) float32."""

    name: str
    detail: str  # what it actually runs on, e.g. the provider list, for logs and status

    def infer(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
