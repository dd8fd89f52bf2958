"""Capture: frame sources (GigE Vision via Aravis, USB/video/RTSP via OpenCV, image folders) feeding the ring.

base.py is what a source is; sources.py opens one by name; process.py is the capture loop.
"""

from .base import CHANNELS, CameraError, CameraUnavailable, FrameInfo, FrameSource, SourceExhausted
from .sources import open_source

__all__ = [
    "CHANNELS",
    "CameraError",
    "CameraUnavailable",
    "FrameInfo",
    "FrameSource",
    "SourceExhausted",
    "open_source",
]
