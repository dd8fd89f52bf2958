"""Frame sources by name: `open_source` and the table from CameraConfig.source to the back-end class.

The contract every source meets is in base.py; each back end imports its optional library itself, when opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import CameraConfig
from .aravis import AravisSource
from .base import FrameSource
from .folder import FolderSource
from .opencv import RtspSource, UsbSource, VideoFileSource

log = logging.getLogger(__name__)

SOURCES: dict[str, Callable[[CameraConfig], FrameSource]] = {
    "gige": AravisSource,
    "usb": UsbSource,
    "video": VideoFileSource,
    "rtsp": RtspSource,
    "folder": FolderSource,
}


def open_source(config: CameraConfig) -> FrameSource:
    """Open and configure the source named by `config.source`; raises CameraError or CameraUnavailable."""
    source = SOURCES[config.source](config)
    log.info(
        "camera %s: %s source open, %dx%d %s",
        config.name,
        config.source,
        source.width,
        source.height,
        config.pixel_format,
    )
    return source
