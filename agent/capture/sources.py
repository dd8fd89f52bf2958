"""Frame sources: the protocol every camera back end meets, its errors and records, and the name -> class table.

A source is opened and configured in its constructor and is usable right after. The capture loop hands it a
(height, width, channels) uint8 view of a ring slot and the source writes one frame into it, without allocating
per frame in steady state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..config import CameraConfig

log = logging.getLogger(__name__)

# Channels per configured pixel format, as delivered into the ring.
CHANNELS = {"mono8": 1, "rgb8": 3, "bgr8": 3}


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
    """

    ok: bool
    t_capture_ns: int
    camera_frame_id: int
    reason: str = ""
    missed_before: int = 0


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


def open_source(config: CameraConfig) -> FrameSource:
    """Open and configure the source named by `config.source`; raises CameraError or CameraUnavailable."""
    # Imported here: the back-end modules import this one, and each imports its optional library lazily itself.
    from .aravis import AravisSource
    from .folder import FolderSource
    from .opencv import RtspSource, UsbSource, VideoFileSource

    classes: dict[str, Callable[[CameraConfig], FrameSource]] = {
        "gige": AravisSource,
        "usb": UsbSource,
        "video": VideoFileSource,
        "rtsp": RtspSource,
        "folder": FolderSource,
    }
    source = classes[config.source](config)
    log.info(
        "camera %s: %s source open, %dx%d %s",
        config.name,
        config.source,
        source.width,
        source.height,
        config.pixel_format,
    )
    return source


def check_out(out: np.ndarray, source: FrameSource) -> None:
    """Refuse an output array the source could not write in place (wrong shape, dtype or memory layout)."""
    expected = (source.height, source.width, source.channels)
    if out.shape != expected or out.dtype != np.uint8 or not out.flags.c_contiguous:
        layout = "" if out.flags.c_contiguous else ", not C-contiguous"
        msg = f"read_into needs a uint8 array of shape {expected}, got {out.dtype} {out.shape}{layout}"
        raise ValueError(msg)


class ReplayClock:
    """Paces a replay at `fps` on a monotonic schedule; when the reader falls behind it re-anchors, never bursts."""

    def __init__(self, fps: float) -> None:
        if fps <= 0:
            msg = f"replay rate must be > 0 frames per second, got {fps}"
            raise ValueError(msg)
        self._period_ns = round(1e9 / fps)
        self._due_ns: int | None = None  # the first frame is due at once

    def wait(self, timeout_s: float) -> bool:
        """Sleep until the next frame is due, at most `timeout_s`; True when it is due."""
        now_ns = time.monotonic_ns()
        if self._due_ns is None:
            self._due_ns = now_ns
        deadline_ns = now_ns + round(max(timeout_s, 0.0) * 1e9)
        while now_ns < self._due_ns:
            if now_ns >= deadline_ns:
                return False
            time.sleep((min(self._due_ns, deadline_ns) - now_ns) / 1e9)
            now_ns = time.monotonic_ns()
        return True

    def advance(self) -> None:
        """The due frame was delivered: the next is due one period later, or one period from now after a stall."""
        now_ns = time.monotonic_ns()
        due_ns = (now_ns if self._due_ns is None else self._due_ns) + self._period_ns
        self._due_ns = now_ns + self._period_ns if due_ns < now_ns - self._period_ns else due_ns
