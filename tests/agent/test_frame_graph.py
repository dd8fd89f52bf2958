"""The GPU frame graph does what agent/model_input.py does with OpenCV: run with ONNX Runtime on real images."""

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from skimage import data

from lineguard.agent.config import RoiConfig
from lineguard.agent.engine.frame_graph import area_weights, frame_graph, resize_weights
from lineguard.agent.model_input import Preprocessor


def astronaut(width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB photograph: edges, skin, flat areas."""
    return np.ascontiguousarray(cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA))


def brick(width: int, height: int) -> np.ndarray:
    """(height, width, 1) uint8 grey texture, like a line camera's mono8 frames."""
    return cv2.resize(data.brick(), (width, height), interpolation=cv2.INTER_AREA)[..., None]


def run_graph(roi: np.ndarray, source_format: str, input_shape: tuple[int, int, int]) -> np.ndarray:
    graph = frame_graph(roi.shape[1:3], roi.shape[3], source_format, input_shape)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return session.run(["image"], {"roi": roi})[0]


def on_the_cpu(frame: np.ndarray, source_format: str, input_shape: tuple[int, int, int]) -> np.ndarray:
    prep = Preprocessor(RoiConfig(), frame.shape, input_shape, source_format)
    return prep(frame, np.empty(input_shape, np.uint8))


@pytest.mark.parametrize(
    ("frame", "source_format", "input_shape"),
    [
        (brick(612, 512), "mono8", (256, 256, 1)),  # non-integer factors, 2.39 x 2
        (brick(300, 200), "mono8", (64, 96, 1)),  # 3.125 x 3.125
        (brick(512, 512), "mono8", (256, 256, 1)),  # integer factor 2: OpenCV rounds halves up
        (brick(512, 512), "mono8", (128, 128, 1)),  # integer factor 4: OpenCV rounds halves to even
        (brick(612, 512), "mono8", (256, 256, 3)),  # grey replicated for a colour model
        (brick(256, 256), "mono8", (256, 256, 3)),  # same size: replication only
        (astronaut(612, 512), "rgb8", (256, 256, 3)),
        (astronaut(612, 512), "bgr8", (256, 256, 3)),
        (astronaut(612, 512), "rgb8", (256, 256, 1)),
        (astronaut(612, 512), "bgr8", (256, 256, 1)),
        (astronaut(300, 200), "rgb8", (64, 96, 3)),
        (astronaut(300, 200), "rgb8", (300, 400, 3)),  # upscale: OpenCV's two-tap "area" filter
        (astronaut(256, 256), "bgr8", (256, 256, 3)),  # same size: channels only
    ],
)
def test_the_frame_graph_matches_opencv_preprocessing_within_one_grey_level(frame, source_format, input_shape):
    expected = on_the_cpu(frame, source_format, input_shape)
    batch = np.stack([frame, frame[::-1].copy()])  # a batch of two: N is dynamic and rows stay apart
    got = run_graph(batch, source_format, input_shape)
    assert got.shape == (2, *input_shape) and got.dtype == np.uint8
    diff = np.abs(got[0].astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    flipped = np.abs(got[1].astype(int) - on_the_cpu(frame[::-1].copy(), source_format, input_shape))
    assert flipped.max() <= 1 and flipped.mean() < 0.05


def test_grey_conversion_is_bit_exact_with_opencv():
    frame = astronaut(300, 200)
    for source_format in ("rgb8", "bgr8"):
        got = run_graph(frame[None], source_format, (200, 300, 1))[0]
        np.testing.assert_array_equal(got, on_the_cpu(frame, source_format, (200, 300, 1)))


def test_area_weights_are_the_overlap_of_each_source_pixel_with_the_footprint():
    np.testing.assert_allclose(
        area_weights(5, 2), [[1 / 2.5, 1 / 2.5, 0.5 / 2.5, 0, 0], [0, 0, 0.5 / 2.5, 1 / 2.5, 1 / 2.5]]
    )
    np.testing.assert_allclose(area_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(area_weights(3, 3), np.eye(3))
    rows_h, rows_w = resize_weights((512, 612), (256, 256))
    np.testing.assert_allclose(rows_h.sum(axis=1), 1)
    np.testing.assert_allclose(rows_w.sum(axis=1), 1)
    with pytest.raises(ValueError, match="downscale only"):
        area_weights(2, 5)


def test_the_graph_takes_any_batch_and_targets_tensorrt_readable_onnx():
    model = onnx.load_from_string(frame_graph((200, 300), 3, "bgr8", (64, 96, 1)))
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "n" and [i.name for i in model.graph.input] == ["roi"]
    assert [o.name for o in model.graph.output] == ["image"]


def test_combinations_preprocessing_refuses_are_refused_here_too():
    with pytest.raises(ValueError, match="takes 2 channels"):
        frame_graph((64, 64), 1, "mono8", (64, 64, 2))
    with pytest.raises(ValueError, match="rgb8 means 3 channels"):
        frame_graph((64, 64), 1, "rgb8", (64, 64, 1))
