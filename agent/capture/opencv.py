"""USB cameras (V4L2), video files and RTSP streams through OpenCV.

OpenCV decodes to BGR; frames are converted into the ring slot with cv2 `dst=` arguments, and bgr8 decodes
straight into it. A decode buffer is allocated once per source, so steady state allocates nothing per frame.
Video files replay at `fps` on a monotonic schedule (and loop if configured); USB and RTSP deliver frames as the
device sends them. OpenCV's read has no per-call timeout: a USB read waits for V4L2's own select timeout and an
RTSP read for _RTSP_READ_TIMEOUT_MS, whatever `timeout_s` asks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from .base import CHANNELS, CameraError, CameraUnavailable, FrameInfo, SourceExhausted, check_out
from .replay import ReplayClock

if TYPE_CHECKING:
    from ..config import CameraConfig

log = logging.getLogger(__name__)

_RTSP_OPEN_TIMEOUT_MS = 5000
_RTSP_READ_TIMEOUT_MS = 2000
_V4L2_EXPOSURE_MANUAL = 1  # V4L2_EXPOSURE_MANUAL in the exposure_auto menu
_V4L2_EXPOSURE_UNIT_US = 100  # V4L2 exposure_time_absolute counts 100 µs units


def bgr_into(frame: np.ndarray, out: np.ndarray, pixel_format: str) -> None:
    """Convert a decoded frame into `out` in `pixel_format`.

    frame: (h, w, 3) BGR or (h, w) grey uint8, as OpenCV decodes; out: (h, w, channels) uint8, same h and w.
    """
    if frame.ndim == 2:
        if pixel_format == "mono8":
            np.copyto(out[:, :, 0], frame)
        else:
            cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if pixel_format == "rgb8" else cv2.COLOR_GRAY2BGR, dst=out)
    elif pixel_format == "mono8":
        cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY, dst=out[:, :, 0])
    elif pixel_format == "rgb8":
        cv2.cvtColor(frame, cv2.COLOR_BGR2RGB, dst=out)
    else:
        np.copyto(out, frame)


class _OpenCvSource:
    """The read path the usb, video and rtsp sources share: decode, check the geometry, convert into `out`."""

    def __init__(self, config: CameraConfig, capture: cv2.VideoCapture, *, what: str) -> None:
        self._config = config
        self._capture = capture
        self._what = what  # e.g. "USB camera /dev/video0", for messages
        self.width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.channels = CHANNELS[config.pixel_format]
        if self.width <= 0 or self.height <= 0:
            capture.release()
            msg = f"camera {config.name}: {what} reports no frame size; check that it holds video (ffprobe)"
            raise CameraError(msg)
        asked = (config.width_px or self.width, config.height_px or self.height)
        if asked != (self.width, self.height):
            log.warning(
                "camera %s: asked for %dx%d, %s delivers %dx%d; using that",
                config.name,
                *asked,
                what,
                self.width,
                self.height,
            )
        self._decoded = np.empty((self.height, self.width, 3), np.uint8)
        self._frames_read = 0

    def _decode_into(self, out: np.ndarray) -> FrameInfo | None:
        """Decode the next frame into `out`; None when the capture has none (end of file, device gone)."""
        target = out if self._config.pixel_format == "bgr8" else self._decoded
        ok, frame = self._capture.read(target)
        if not ok:
            return None
        t_capture_ns = time.monotonic_ns()
        frame_id = self._frames_read
        self._frames_read += 1
        if frame.shape[:2] != (self.height, self.width):
            reason = f"frame is {frame.shape[1]}x{frame.shape[0]}, expected {self.width}x{self.height}"
            return FrameInfo(ok=False, t_capture_ns=t_capture_ns, camera_frame_id=frame_id, reason=reason)
        if frame is not out:
            bgr_into(frame, out, self._config.pixel_format)
        return FrameInfo(ok=True, t_capture_ns=t_capture_ns, camera_frame_id=frame_id)

    def close(self) -> None:
        self._capture.release()


class UsbSource(_OpenCvSource):
    """A USB (UVC) camera through V4L2: address is a device index ("0") or path ("/dev/video0")."""

    def __init__(self, config: CameraConfig) -> None:
        address = config.address or "0"
        device: int | str = int(address) if address.isdigit() else address
        where = f"/dev/video{device}" if isinstance(device, int) else device
        capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not capture.isOpened():
            capture.release()
            msg = (
                f"camera {config.name}: cannot open USB camera {where} through V4L2; check that it is plugged in "
                f"(ls /dev/video*), that this user may read it (group video) and that no other program holds it"
            )
            raise CameraUnavailable(msg)
        _configure_usb(capture, config, where)
        super().__init__(config, capture, what=f"USB camera {where}")

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        check_out(out, self)
        info = self._decode_into(out)
        if info is None:
            msg = f"camera {self._config.name}: {self._what} stopped delivering frames; unplugged? (ls /dev/video*)"
            raise CameraUnavailable(msg)
        return info


def _configure_usb(capture: cv2.VideoCapture, config: CameraConfig, where: str) -> None:
    """Ask for the configured size and exposure; a driver that refuses is logged, the delivered size is used."""
    settings: list[tuple[str, int, float]] = []
    if config.width_px:
        settings.append(("width", cv2.CAP_PROP_FRAME_WIDTH, config.width_px))
    if config.height_px:
        settings.append(("height", cv2.CAP_PROP_FRAME_HEIGHT, config.height_px))
    if config.exposure_us is not None:
        settings.append(("manual exposure", cv2.CAP_PROP_AUTO_EXPOSURE, _V4L2_EXPOSURE_MANUAL))
        settings.append(("exposure", cv2.CAP_PROP_EXPOSURE, config.exposure_us / _V4L2_EXPOSURE_UNIT_US))
    for name, prop, value in settings:
        if not capture.set(prop, value):
            log.warning("camera %s: USB camera %s refused %s = %s", config.name, where, name, value)


class VideoFileSource(_OpenCvSource):
    """A video file replayed at `fps`, looping if configured; camera_frame_id counts frames from 0."""

    def __init__(self, config: CameraConfig) -> None:
        self._path = Path(config.address)
        if not config.address or not self._path.is_file():
            msg = f"camera {config.name}: video file {config.address!r} does not exist; set the camera's address to a video file"
            raise CameraError(msg)
        super().__init__(config, _open_video(self._path, config.name), what=f"video {self._path}")
        self._clock = ReplayClock(config.fps)

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        check_out(out, self)
        if not self._clock.wait(timeout_s):
            return None
        info = self._decode_into(out)
        if info is None:
            if not self._config.loop:
                msg = f"camera {self._config.name}: video {self._path} ended after {self._frames_read} frames; set loop = true to repeat it"
                raise SourceExhausted(msg)
            self._capture.release()  # reopening rewinds every container, seeking does not
            self._capture = _open_video(self._path, self._config.name)
            info = self._decode_into(out)
            if info is None:
                msg = f"camera {self._config.name}: video {self._path} yields no frame after rewinding"
                raise CameraError(msg)
        self._clock.advance()
        return info


def _open_video(path: Path, camera_name: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        msg = f"camera {camera_name}: OpenCV cannot decode video {path}; check it with ffprobe"
        raise CameraError(msg)
    return capture


class RtspSource(_OpenCvSource):
    """A network stream (rtsp://, http://) through FFmpeg; a stream that stops raises CameraUnavailable."""

    def __init__(self, config: CameraConfig) -> None:
        if not config.address:
            msg = f"camera {config.name}: rtsp source needs an address such as rtsp://host:554/stream"
            raise CameraError(msg)
        url = _redact(config.address)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            _RTSP_OPEN_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            _RTSP_READ_TIMEOUT_MS,
        ]
        capture = cv2.VideoCapture(config.address, cv2.CAP_FFMPEG, params)
        if not capture.isOpened():
            capture.release()
            msg = f"camera {config.name}: cannot open stream {url}; check the URL, the credentials and that the camera is reachable (ffprobe URL)"
            raise CameraUnavailable(msg)
        super().__init__(config, capture, what=f"stream {url}")

    def read_into(self, out: np.ndarray, *, timeout_s: float) -> FrameInfo | None:
        check_out(out, self)
        info = self._decode_into(out)
        if info is None:
            msg = f"camera {self._config.name}: {self._what} stopped (camera or network); reconnecting"
            raise CameraUnavailable(msg)
        return info


def _redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
