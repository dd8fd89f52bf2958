"""Frame to model input: crop the configured ROI from the ring slot, convert channels, resize."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..config import RoiConfig
from .frame_graph import SourceFormat


class InputMismatch(Exception):
    """The camera's frames cannot feed the model (ROI outside the frame, channel count, aspect)."""


@dataclass(frozen=True, slots=True)
class Preprocessor:
    """Maps (H, W, C_cam) uint8 frames to (h, w, c_model) uint8 model input.

    Built once per camera and model; `check` runs at start-up and model swap so a mismatch is
    refused before any frame is lost to it.
    """

    roi: RoiConfig
    frame_shape: tuple[int, int, int]
    input_shape: tuple[int, int, int]
    source_format: SourceFormat

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        frame_h, frame_w, frame_c = self.frame_shape
        x, y, w, h = self.box
        if x + w > frame_w or y + h > frame_h or w <= 0 or h <= 0:
            msg = f"ROI x={x} y={y} {w}x{h} does not fit the camera's {frame_w}x{frame_h} frames: fix cameras.roi"
            raise InputMismatch(msg)
        expected_c = 1 if self.source_format == "mono8" else 3
        if frame_c != expected_c:
            msg = f"camera delivers {frame_c} channels but pixel_format {self.source_format} means {expected_c}"
            raise InputMismatch(msg)
        model_h, model_w, model_c = self.input_shape
        if model_c == 3 and frame_c == 1:
            msg = "the model expects colour (rgb8) but the camera delivers mono8: set pixel_format = 'rgb8' or use a grey model"
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
        """frame: (H, W, C_cam) uint8 slot view; out: (h, w, c_model) uint8, written and returned."""
        if frame.shape != self.frame_shape:
            msg = f"frame is {frame.shape}, camera was configured for {self.frame_shape}"
            raise InputMismatch(msg)
        x, y, w, h = self.box
        region = frame[y : y + h, x : x + w]
        model_h, model_w, model_c = self.input_shape
        if model_c == 1 and region.shape[2] == 3:
            code = cv2.COLOR_RGB2GRAY if self.source_format == "rgb8" else cv2.COLOR_BGR2GRAY
            region = cv2.cvtColor(region, code)
        elif model_c == 3 and self.source_format == "bgr8":
            region = cv2.cvtColor(region, cv2.COLOR_BGR2RGB)
        target = out.reshape(model_h, model_w) if model_c == 1 else out
        if region.shape[:2] == (model_h, model_w):
            target[...] = region.reshape(target.shape)
        else:
            cv2.resize(
                region.reshape(region.shape[0], region.shape[1], -1).squeeze(),
                (model_w, model_h),
                dst=target,
                interpolation=cv2.INTER_AREA,
            )
        return out
