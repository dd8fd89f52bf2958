"""The ROI-to-model-input step as an ONNX graph, so the GPU can do what agent/model_input.py does with OpenCV.

`frame_graph` maps an ROI-sized batch `roi` (N, h_roi, w_roi, C_cam) uint8 to the model input `image`
(N, h, w, C_model) uint8: channel order or grey conversion, then resampling as two MatMuls with constant
weight matrices, then rounding, then grey replicated into three channels for a colour model fed by mono8. The ROI crop is not in the graph: the host-to-device copy takes only the ROI
rows and columns out of the ring slot (engine/cuda.py `Stream.to_device_2d`).

The weights reproduce `cv2.resize(..., interpolation=cv2.INTER_AREA)` and `cv2.cvtColor` as to_model_input
calls them: a model scored on GPU-prepared frames sees what its canary and the CPU path see, within one grey
level (float rounding at exact halves); tests/agent/test_frame_graph.py compares the two on real images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..model_input import CHANNELS, PixelFormat

ROI_NAME = "roi"
IMAGE_NAME = "image"  # the model graph's input (engine/backends/tensorrt.py INPUT_NAME)
OPSET = 17
IR_VERSION = 8  # what TensorRT 10.x's ONNX parser (JetPack 6) and ONNX Runtime >= 1.14 both read

# cv2.cvtColor(RGB2GRAY) on uint8: 0.299 R + 0.587 G + 0.114 B in 15-bit fixed point, rounded half up. These
# are dyadic fractions, so float32 computes the same sum exactly and the grey values match OpenCV bit for bit.
_GREY_WEIGHTS_RGB = np.array([9798, 19235, 3735], np.float64) / 32768
_COEF_SCALE = 2048  # OpenCV's fixed-point scale of linear resize weights on uint8


def area_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 weights of OpenCV INTER_AREA downscaling along one axis (src >= dst).

    Entry [i, j] is the overlap of source pixel [j, j + 1) with destination pixel i's footprint
    [i * s, (i + 1) * s), s = src / dst, divided by s: each row averages the pixels it covers.
    """
    if not 1 <= dst <= src:
        msg = f"area weights downscale only: {src} -> {dst}"
        raise ValueError(msg)
    scale = src / dst
    weights = np.zeros((dst, src))
    for i in range(dst):
        start, end = i * scale, (i + 1) * scale
        for j in range(math.floor(start), min(math.ceil(end), src)):
            weights[i, j] = (min(end, j + 1) - max(start, j)) / scale
    return weights


def area_mode_linear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 weights of what OpenCV INTER_AREA does when an axis is enlarged: a two-tap filter.

    OpenCV's resize takes, for destination pixel d, sx = floor(d * s) and the fraction
    f = (d + 1) - (sx + 1) / s (0 when <= 0, else its fractional part), s = src / dst, and blends
    (1 - f) of pixel sx with f of pixel sx + 1, clamping at the last pixel. On uint8 it rounds both
    weights to 11 bits (INTER_RESIZE_COEF_BITS), as done here.
    """
    scale, inverse = src / dst, dst / src
    weights = np.zeros((dst, src))
    for d in range(dst):
        sx = math.floor(d * scale)
        fraction = (d + 1) - (sx + 1) * inverse
        fraction = 0.0 if fraction <= 0 else fraction - math.floor(fraction)
        if sx >= src - 1:
            sx, fraction = src - 1, 0.0
        weights[d, sx] += round((1 - fraction) * _COEF_SCALE) / _COEF_SCALE
        if fraction:
            weights[d, sx + 1] += round(fraction * _COEF_SCALE) / _COEF_SCALE
    return weights


def resize_weights(roi_hw: tuple[int, int], model_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(R_h (h, h_roi), R_w (w, w_roi)) such that R_h @ roi @ R_w.T is cv2.resize(roi, (w, h), INTER_AREA).

    OpenCV averages areas only when neither axis grows; as soon as one does, both axes take its
    two-tap "area mode" linear filter. The same choice is made here.
    """
    (h_roi, w_roi), (h, w) = roi_hw, model_hw
    if h <= h_roi and w <= w_roi:
        return area_weights(h_roi, h), area_weights(w_roi, w)
    return area_mode_linear_weights(h_roi, h), area_mode_linear_weights(w_roi, w)


def _rounds_half_up(roi_hw: tuple[int, int], model_hw: tuple[int, int]) -> bool:
    """True where OpenCV rounds halves up: its integer 2x2 block average and its fixed-point linear filter.

    Every other INTER_AREA case rounds a float sum with cvRound (half to even). The choice only
    matters at exact halves, which whole-number factors produce often.
    """
    (h_roi, w_roi), (h, w) = roi_hw, model_hw
    return (h_roi, w_roi) == (2 * h, 2 * w) or h > h_roi or w > w_roi


def frame_graph(
    roi_hw: tuple[int, int], camera_channels: int, source_format: PixelFormat, input_shape: tuple[int, int, int]
) -> bytes:
    """Serialised ONNX model: `roi` (N, h_roi, w_roi, C_cam) uint8 -> `image` (N, h, w, C_model) uint8.

    input_shape is the model's (h, w, C_model); N is dynamic. Raises ValueError for a combination
    to_model_input refuses too (a channel count that does not match the pixel format, a model that
    takes neither 1 nor 3 channels).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w, model_channels = input_shape
    _check(camera_channels, source_format, model_channels)
    nodes: list[onnx.NodeProto] = []
    constants: dict[str, onnx.TensorProto] = {}

    def constant(name: str, value: np.ndarray) -> str:
        constants.setdefault(name, numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], **attributes: Any) -> str:
        output = f"{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def round_half_up(x: str) -> str:
        return node("Floor", [node("Add", [x, constant("half", np.array(0.5, np.float32))])])

    x = node("Cast", [ROI_NAME], to=TensorProto.FLOAT)
    if model_channels == 1 and camera_channels == 3:
        weights = _GREY_WEIGHTS_RGB if source_format == "rgb8" else _GREY_WEIGHTS_RGB[::-1]
        x = round_half_up(node("MatMul", [x, constant("grey", weights.reshape(3, 1).astype(np.float32))]))
    elif model_channels == 3 and source_format == "bgr8":
        x = node("Gather", [x, constant("bgr_to_rgb", np.array([2, 1, 0], np.int64))], axis=3)
    if roi_hw != (h, w):  # to_model_input copies a ROI of the model's size as it is
        weights_h, weights_w = resize_weights(roi_hw, (h, w))
        r_h, r_w = constant("r_h", weights_h.astype(np.float32)), constant("r_w_t", weights_w.T.astype(np.float32))
        x = node("Transpose", [x], perm=[0, 3, 1, 2])  # (N, C, h_roi, w_roi): rows and columns are the last two axes
        h_roi, w_roi = roi_hw
        if h_roi * w_roi * w + h * h_roi * w <= h * h_roi * w_roi + h * w_roi * w:  # the cheaper order
            x = node("MatMul", [r_h, node("MatMul", [x, r_w])])
        else:
            x = node("MatMul", [node("MatMul", [r_h, x]), r_w])
        x = node("Transpose", [x], perm=[0, 2, 3, 1])
        x = round_half_up(x) if _rounds_half_up(roi_hw, (h, w)) else node("Round", [x])
    if model_channels == 3 and camera_channels == 1:  # after resampling: a third of the work, the same values
        x = node("Gather", [x, constant("grey_to_rgb", np.array([0, 0, 0], np.int64))], axis=3)
    x = node("Clip", [x, constant("zero", np.array(0, np.float32)), constant("full", np.array(255, np.float32))])
    nodes.append(helper.make_node("Cast", [x], [IMAGE_NAME], name="to_uint8", to=TensorProto.UINT8))
    graph = helper.make_graph(
        nodes,
        "lineguard-frame",
        [helper.make_tensor_value_info(ROI_NAME, TensorProto.UINT8, ["n", *roi_hw, camera_channels])],
        [helper.make_tensor_value_info(IMAGE_NAME, TensorProto.UINT8, ["n", h, w, model_channels])],
        initializer=list(constants.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lineguard")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _check(camera_channels: int, source_format: PixelFormat, model_channels: int) -> None:
    expected = CHANNELS[source_format]
    if camera_channels != expected:
        msg = f"pixel_format {source_format} means {expected} channels, the frames have {camera_channels}"
        raise ValueError(msg)
    if model_channels not in (1, 3):
        msg = f"the model takes {model_channels} channels; frames can feed 1 (grey) or 3 (RGB)"
        raise ValueError(msg)
