"""INT8 calibration data: good images at the model's input, in fixed-size batches for TensorRT.

The image loading and batching are plain functions (tested everywhere); the TensorRT
calibrator class is a thin shell around them, built only where tensorrt is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lineguard.agent.bundle import InputSpec
from lineguard.agent.model_input import to_model_input

from ..data import IMAGE_SUFFIXES, decoded_format, read_image
from ..errors import EngineBuildError

log = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 8


def load_calibration_images(folder: Path, spec: InputSpec, *, max_images: int = 512) -> np.ndarray:
    """Up to max_images images from folder (sorted by name) as (N, H, W, C) uint8 model input.

    Grey or colour and the size follow the bundle's input spec, by the agent's rule (agent/model_input.py).
    """
    if not folder.is_dir():
        msg = f"calibration folder {folder} does not exist: give a folder of good images (--calibration-images)"
        raise EngineBuildError(msg)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
    if len(paths) < MIN_CALIBRATION_IMAGES:
        msg = (
            f"{folder} holds {len(paths)} images; INT8 calibration needs at least {MIN_CALIBRATION_IMAGES} good images"
        )
        raise EngineBuildError(msg)
    images = np.empty((len(paths), spec.height, spec.width, spec.channels), np.uint8)
    for index, path in enumerate(paths):
        image = read_image(path)
        to_model_input(image, pixel_format=decoded_format(image), input_shape=images.shape[1:], out=images[index])
    return images


def calibration_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Contiguous (batch_size, H, W, C) batches; a last partial batch is dropped (TensorRT wants full ones)."""
    if batch_size < 1:
        msg = f"calibration batch size must be >= 1, got {batch_size}"
        raise EngineBuildError(msg)
    for start in range(0, len(images) - batch_size + 1, batch_size):
        yield np.ascontiguousarray(images[start : start + batch_size])


def entropy_calibrator(trt: ModuleType, images: np.ndarray, *, batch_size: int, input_name: str) -> Any:
    """A trt.IInt8EntropyCalibrator2 that feeds `images` to the network input, batch_size at a time.

    The batches have the calibration profile's optimum shape (batch_size = --max-batch).
    """
    from lineguard.agent.engine.cuda import Stream, runtime

    base = _calibrator_base(trt, len(images), batch_size)

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()  # pybind11 classes need the base initialiser called explicitly
            self.stream = Stream(runtime())
            self.device = self.stream.device(batch_size * int(np.prod(images.shape[1:])))
            self.batches = calibration_batches(images, batch_size)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if names != [input_name]:
                log.error("calibration asked for inputs %s; the graph's only input is %s", names, input_name)
                return None
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.stream.to_device(self.device, batch)
            self.stream.synchronize()
            return [self.device]

        def read_calibration_cache(self) -> None:
            return None  # calibrate afresh: the images or the graph may have changed

        def write_calibration_cache(self, cache: bytes) -> None:
            log.debug("INT8 calibration table: %d bytes (not kept)", len(cache))

        def close(self) -> None:
            self.stream.close()

    return EntropyCalibrator()


def _calibrator_base(trt: ModuleType, n_images: int, batch_size: int) -> type:
    if n_images < batch_size:
        msg = f"INT8 calibration feeds whole batches of {batch_size} (--max-batch): give at least that many images, got {n_images}"
        raise EngineBuildError(msg)
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        msg = f"TensorRT {trt.__version__} has no implicit INT8 calibration (IInt8EntropyCalibrator2); build fp16, or quantise the ONNX graph explicitly"
        raise EngineBuildError(msg)
    return base
