"""Training-time feature extraction in ONNX Runtime: the same frozen module, faster than torch eager on a CPU.

Fitting a PatchCore is mostly one forward pass of the frozen backbone over every training image;
FCDD and FastFlow also extract their frozen features once before training their heads.
ONNX Runtime runs that graph faster than torch's eager mode on a CPU (fused convolutions, no
Python per layer), so the module is exported once to a temporary file and run there. The
features differ from torch's only by float32 rounding (checked in tests/trainer/test_onnx_features.py);
the exported model is still checked for parity against torch at `export`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .errors import ModelError
from .export import OPSET, cpu_session

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "features"


def extract_features(
    module: nn.Module, images: np.ndarray, *, batch_size: int = 16, progress: bool = False
) -> torch.Tensor:
    """module(images) for every image, run in ONNX Runtime on the CPU.

    module: a frozen nn.Module taking (N, H, W, C) uint8 and returning one float32 tensor (N, ...).
    images: (N, H, W, C) uint8. Returns the concatenated outputs, (N, ...) float32.
    """
    _check_images(images)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lineguard-features-") as folder:
        path = _export(module, images[:1], Path(folder) / "features.onnx")
        session = cpu_session(path)
        batches = range(0, len(images), batch_size)
        chunks = [
            session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + batch_size]})[0]
            for start in tqdm(batches, desc="features", unit="batch", disable=not progress)
        ]
    log.info("features of %d images in %.1f s (ONNX Runtime)", len(images), time.perf_counter() - started)
    return torch.from_numpy(np.concatenate(chunks))


def extract_feature_maps(
    module: nn.Module, images: np.ndarray, *, batch_size: int = 16, progress: bool = False
) -> list[torch.Tensor]:
    """Like extract_features, for a module returning several tensors (one per backbone stage): one (N, ...) each."""
    _check_images(images)
    with torch.inference_mode():
        shapes = [tuple(output.shape[1:]) for output in module.eval()(torch.from_numpy(images[:1]))]
    flat = extract_features(_Concatenated(module), images, batch_size=batch_size, progress=progress)
    parts = torch.split(flat, [math.prod(shape) for shape in shapes], dim=1)
    return [part.reshape(len(images), *shape) for part, shape in zip(parts, shapes, strict=True)]


class _Concatenated(nn.Module):
    """A module's several (N, ...) outputs as one (N, total) tensor: the one output extract_features runs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([output.flatten(1) for output in self.module(images)], dim=1)


def in_one_pass(extract: Callable[[np.ndarray], Any], *image_sets: np.ndarray | None) -> list[Any]:
    """extract run once over several image sets together (one export, one session), its rows handed back per set.

    extract: images -> a tensor (extract_features) or a list of tensors (extract_feature_maps), N rows each.
    Returns one result per set, of the same form; a set that is None gives None.
    """
    present = [images for images in image_sets if images is not None]
    together = extract(np.concatenate(present))
    sizes = [len(images) for images in present]
    parts: list[Any]
    if isinstance(together, torch.Tensor):
        parts = list(torch.split(together, sizes))
    else:
        parts = [list(stages) for stages in zip(*(torch.split(stage, sizes) for stage in together), strict=True)]
    remaining = iter(parts)
    return [None if images is None else next(remaining) for images in image_sets]


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        msg = f"feature extraction needs a non-empty (N, H, W, C) uint8 array, got {images.shape} {images.dtype}"
        raise ModelError(msg)


def _export(module: nn.Module, example: np.ndarray, path: Path) -> Path:
    """Trace module into an ONNX graph with a dynamic batch axis."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter; see export.py
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # harmless: folds less
        torch.onnx.export(
            module.eval(),
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "n"}, OUTPUT_NAME: {0: "n"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return path
