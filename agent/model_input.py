"""Frame -> model input: ROI crop, channel conversion, INTER_AREA resize. The one copy, for trainer and agent.

The trainer's images (trainer/data.py) and the agent's ring slots (engine, decision's heatmaps) go through
`to_model_input`, so a model sees in service the pixels it was trained and calibrated on. The rule:

- grey frame, colour model: the grey values are replicated into three equal channels (R = G = B), as a grey
  training image decoded for a colour model is; a mono8 camera can feed a 3-channel model.
- colour frame, grey model: OpenCV's luma, 0.299 R + 0.587 G + 0.114 B, read in the frame's channel order.
- bgr8 frame, colour model: reordered to RGB (every colour model takes RGB).
- size: cv2.resize(INTER_AREA) to the model's height x width, after any grey conversion and before the
  replication (fewer channels to resize). Rounding makes the order matter; trainer and agent share it here.
- ROI (agent only): cropped from the frame before all of that.

engine/frame_graph.py does the same on the GPU, within one grey level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from .config import RoiConfig

PixelFormat = Literal["mono8", "rgb8", "bgr8"]
# Channels per pixel format, as delivered into the ring and as this module reads them.
CHANNELS: dict[str, int] = {"mono8": 1, "rgb8": 3, "bgr8": 3}
_TO_GREY = {"rgb8": cv2.COLOR_RGB2GRAY, "bgr8": cv2.COLOR_BGR2GRAY}


class InputMismatch(Exception):
    """The frames cannot feed the model (ROI outside the frame, channel count, aspect); the message says the fix."""


def to_model_input(
    image: np.ndarray, *, pixel_format: PixelFormat, input_shape: tuple[int, int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """One image to model input by the rule above.

    image: (H, W) or (H, W, C) uint8 in pixel_format, any strides (a ROI view of a ring slot is fine).
    input_shape: the model's (h, w, c), c in (1, 3). out: (h, w, c) uint8 C-contiguous, written and
    returned; a new array when None.
    """
    height, width, channels = input_shape
    converted = _convert_channels(_as_hwc(image, pixel_format), pixel_format, channels)
    if out is None:
        out = np.empty(input_shape, np.uint8)
    elif out.shape != input_shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        msg = f"model input buffer must be C-contiguous uint8 {input_shape}, got {out.dtype} {out.shape}"
        raise ValueError(msg)
    if converted.ndim == 3:  # RGB for a colour model
        _resize_into(converted, out)
    elif channels == 1:
        _resize_into(converted, out.reshape(height, width))
    else:  # grey for a colour model: resize once, replicate
        out[...] = _resized(converted, height, width)[:, :, np.newaxis]
    return out


def _as_hwc(image: np.ndarray, pixel_format: PixelFormat) -> np.ndarray:
    """(H, W, C) view of image, checked against pixel_format's channel count."""
    hwc = image[:, :, np.newaxis] if image.ndim == 2 else image
    expected = CHANNELS[pixel_format]
    if image.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[2] != expected:
        msg = f"a {pixel_format} image is uint8 (H, W, {expected}), got {image.dtype} {image.shape}"
        raise InputMismatch(msg)
    return hwc


def _convert_channels(image: np.ndarray, pixel_format: PixelFormat, channels: int) -> np.ndarray:
    """(H, W) grey, or (H, W, 3) RGB when the model takes colour and the image has it."""
    if channels not in (1, 3):
        msg = f"the model takes {channels} channels; frames can feed 1 (grey) or 3 (RGB)"
        raise InputMismatch(msg)
    if pixel_format == "mono8":
        return image[:, :, 0]
    if channels == 1:
        return cv2.cvtColor(image, _TO_GREY[pixel_format])
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if pixel_format == "bgr8" else image


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def _resize_into(image: np.ndarray, out: np.ndarray) -> None:
    """Area-resize image into out (same channel count), or copy it when the sizes already match."""
    if image.shape[:2] == out.shape[:2]:
        out[...] = image
    else:
        cv2.resize(image, (out.shape[1], out.shape[0]), dst=out, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True, slots=True)
class Preprocessor:
    """One camera's (H, W, C_cam) uint8 frames -> the model's (h, w, c) uint8 input: ROI crop, then to_model_input.

    Built once per camera and frame size; the constructor checks the combination (InputMismatch with the fix),
    so the engine learns of a camera that cannot feed the model at its first frame.
    """

    roi: RoiConfig
    frame_shape: tuple[int, int, int]
    input_shape: tuple[int, int, int]
    source_format: PixelFormat

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise InputMismatch when the ROI, the channels or the aspect cannot feed the model."""
        frame_h, frame_w, frame_c = self.frame_shape
        x, y, w, h = self.box
        if x + w > frame_w or y + h > frame_h or w <= 0 or h <= 0:
            msg = f"ROI x={x} y={y} {w}x{h} does not fit the camera's {frame_w}x{frame_h} frames: fix cameras.roi"
            raise InputMismatch(msg)
        expected_c = CHANNELS[self.source_format]
        if frame_c != expected_c:
            msg = f"camera delivers {frame_c} channels but pixel_format {self.source_format} means {expected_c}"
            raise InputMismatch(msg)
        model_h, model_w, model_c = self.input_shape
        if model_c not in (1, 3):
            msg = f"the model takes {model_c} channels; frames can feed 1 (grey) or 3 (RGB)"
            raise InputMismatch(msg)
        aspect_roi, aspect_model = w / h, model_w / model_h
        if abs(aspect_roi / aspect_model - 1) > 0.25:
            msg = (
                f"ROI {w}x{h} (aspect {aspect_roi:.2f}) would be squashed into the model's {model_w}x{model_h} "
                f"(aspect {aspect_model:.2f}): set cameras.roi to the trained field of view"
            )
            raise InputMismatch(msg)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the ROI in frame pixels, zero sizes resolved to the frame's edges."""
        frame_h, frame_w, _ = self.frame_shape
        roi = self.roi
        return roi.x, roi.y, roi.width or frame_w - roi.x, roi.height or frame_h - roi.y

    def __call__(self, frame: np.ndarray, out: np.ndarray) -> np.ndarray:
        """frame: (H, W, C_cam) uint8 slot view; out: (h, w, c) uint8, written and returned."""
        if frame.shape != self.frame_shape:
            msg = f"frame is {frame.shape}, camera was configured for {self.frame_shape}"
            raise InputMismatch(msg)
        x, y, w, h = self.box
        return to_model_input(
            frame[y : y + h, x : x + w], pixel_format=self.source_format, input_shape=self.input_shape, out=out
        )
