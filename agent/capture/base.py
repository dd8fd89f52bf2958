"""What every frame source is: the protocol a camera back end meets, its errors and the record of one frame.

A source is opened and configured in its constructor and is usable right after. The capture loop hands it a
(height, width, channels) uint8 view of a ring slot and the source writes one frame into it, without allocating
per frame in steady state. Back ends (aravis.py, opencv.py, folder.py) import this module; sources.py opens them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..model_input import CHANNELS

__all__ = ["CHANNELS", "CameraError", "CameraUnavailable", "FrameInfo", "FrameSource", "SourceExhausted", "check_out"]


class CameraError(Exception):
    """A camera could not be opened or configured; the message names the camera, what failed and what to check."""


class CameraUnavailable(CameraError):
    """The device is absent or stopped answering; the capture loop closes the source and retries with backoff."""


class SourceExhausted(Exception):
    """A non-looping folder or video replay delivered its last frame."""


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """What a source knows about one delivered frame.

    ok: False when the frame arrived broken (incomplete GigE buffer, undecodable image); the caller emits a
        failsafe for it instead of scoring the pixels.
    t_capture_ns: time.monotonic_ns() when the frame was delivered (or the camera's receive time mapped to it).
    camera_frame_id: the camera's own frame counter; replay sources count frames from 0; -1 when unknown.
    missed_before: frames the camera says were lost right before this one (frame-id gap); each needs a failsafe.
    camera_timestamp_ns: the camera's own clock for this frame (GigE Vision: the stream leader's timestamp),
        -1 where the source has none (replays, V4L2, RTSP).
    """

    ok: bool
    t_capture_ns: int
    camera_frame_id: int
    reason: str = ""
    missed_before: int = 0
    camera_timestamp_ns: int = -1


class FrameSource(Protocol):
    """One camera, video or image folder, delivering frames of a fixed geometry."""

    height: int
    width: int
    channels: int

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        """Write the next frame into `out` ((height, width, channels) uint8, C-contiguous); None on timeout.

        Raises CameraUnavailable when the device went away, SourceExhausted at the end of a non-looping replay.
        """
        ...

    def close(self) -> None:
        """Stop acquisition and release the device; safe to call twice."""
        ...


def check_out(out: np.ndarray, source: FrameSource) -> None:
    """Refuse an output array the source could not write in place (wrong shape, dtype or memory layout)."""
    expected = (source.height, source.width, source.channels)
    if out.shape != expected or out.dtype != np.uint8 or not out.flags.c_contiguous:
        layout = "" if out.flags.c_contiguous else ", not C-contiguous"
        msg = f"read_into needs a uint8 array of shape {expected}, got {out.dtype} {out.shape}{layout}"
        raise ValueError(msg)
