"""A folder of images replayed as a camera: sorted by name, at `fps` on a monotonic schedule, looping if configured.

The first readable image fixes the geometry. An image that cannot be decoded, or has another size, is delivered
as a broken frame (FrameInfo.ok False, with the reason) so the line sees a failsafe instead of a crash.
camera_frame_id counts delivered frames from 0, across loops.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .base import CHANNELS, CameraError, FrameInfo, SourceExhausted, check_out
from .opencv import bgr_into
from .replay import ReplayClock

if TYPE_CHECKING:
    from ..config import CameraConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class FolderSource:
    """Replays the images in `config.address` (not recursive)."""

    def __init__(self, config: CameraConfig) -> None:
        self._config = config
        self._folder = Path(config.address)
        if not config.address or not self._folder.is_dir():
            msg = f"camera {config.name}: image folder {config.address!r} is not a directory; set the camera's address to a folder of images"
            raise CameraError(msg)
        self._paths = sorted(p for p in self._folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self._paths:
            suffixes = " ".join(sorted(IMAGE_SUFFIXES))
            msg = f"camera {config.name}: folder {self._folder} holds no images ({suffixes})"
            raise CameraError(msg)
        self._flags = cv2.IMREAD_GRAYSCALE if config.pixel_format == "mono8" else cv2.IMREAD_COLOR
        self.height, self.width = self._first_geometry()
        self.channels = CHANNELS[config.pixel_format]
        if (config.width_px, config.height_px) not in ((0, 0), (self.width, self.height)):
            log.warning(
                "camera %s: width_px/height_px are ignored for a folder; its images are %dx%d",
                config.name,
                self.width,
                self.height,
            )
        self._clock = ReplayClock(config.fps)
        self._next_index = 0
        self._frames_delivered = 0

    def _first_geometry(self) -> tuple[int, int]:
        """(height, width) of the first image that decodes."""
        for path in self._paths:
            image = cv2.imread(str(path), self._flags)
            if image is not None:
                return image.shape[0], image.shape[1]
        msg = f"camera {self._config.name}: none of the {len(self._paths)} images in {self._folder} can be decoded"
        raise CameraError(msg)

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        check_out(out, self)
        if self._next_index == len(self._paths):
            if not self._config.loop:
                msg = f"camera {self._config.name}: replayed all {len(self._paths)} images of {self._folder}; set loop = true to repeat them"
                raise SourceExhausted(msg)
            self._next_index = 0
        if not self._clock.wait(timeout_s):
            return None
        path = self._paths[self._next_index]
        self._next_index += 1
        frame_id = self._frames_delivered
        self._frames_delivered += 1
        image = cv2.imread(str(path), self._flags)
        self._clock.advance()
        t_capture_ns = time.monotonic_ns()
        if image is None:
            return FrameInfo(
                ok=False, t_capture_ns=t_capture_ns, camera_frame_id=frame_id, reason=f"cannot decode image {path.name}"
            )
        if image.shape[:2] != (self.height, self.width):
            reason = f"{path.name} is {image.shape[1]}x{image.shape[0]}, expected {self.width}x{self.height}"
            return FrameInfo(ok=False, t_capture_ns=t_capture_ns, camera_frame_id=frame_id, reason=reason)
        bgr_into(image, out, self._config.pixel_format)
        return FrameInfo(ok=True, t_capture_ns=t_capture_ns, camera_frame_id=frame_id)

    def close(self) -> None:
        """Nothing to release; present for the FrameSource protocol."""
