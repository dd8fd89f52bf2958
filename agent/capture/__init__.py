"""Capture: frame sources (GigE Vision via Aravis, USB/video/RTSP via OpenCV, image folders) feeding the ring."""

from .sources import (
    CHANNELS,
    CameraError,
    CameraUnavailable,
    FrameInfo,
    FrameSource,
    SourceExhausted,
    open_source,
)

__all__ = [
    "CHANNELS",
    "CameraError",
    "CameraUnavailable",
    "FrameInfo",
    "FrameSource",
    "SourceExhausted",
    "open_source",
]
