import numpy as np
import pytest

from lineguard.agent.config import RoiConfig
from lineguard.agent.engine.preprocess import InputMismatch, Preprocessor


def test_the_roi_is_cropped_and_resized_to_the_model_input():
    frame = np.zeros((480, 640, 1), np.uint8)
    frame[100:300, 200:400] = 200
    prep = Preprocessor(RoiConfig(x=200, y=100, width=200, height=200), (480, 640, 1), (64, 64, 1), "mono8")
    out = prep(frame, np.empty((64, 64, 1), np.uint8))
    assert out.shape == (64, 64, 1) and np.all(out == 200)


def test_colour_frames_feed_a_grey_model_and_bgr_is_converted_for_an_rgb_model():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    rgb = Preprocessor(RoiConfig(), (64, 64, 3), (64, 64, 3), "bgr8")(frame, np.empty((64, 64, 3), np.uint8))
    assert rgb[0, 0].tolist() == [0, 0, 255]
    grey = Preprocessor(RoiConfig(), (64, 64, 3), (32, 32, 1), "bgr8")(frame, np.empty((32, 32, 1), np.uint8))
    assert grey.shape == (32, 32, 1) and 20 < int(grey[0, 0, 0]) < 40  # 0.114 * 255


@pytest.mark.parametrize(
    ("roi", "frame_shape", "input_shape", "fmt", "fragment"),
    [
        (RoiConfig(x=600, width=100), (480, 640, 1), (64, 64, 1), "mono8", "does not fit"),
        (RoiConfig(), (480, 640, 1), (64, 64, 3), "mono8", "expects colour"),
        (RoiConfig(), (480, 1280, 1), (64, 64, 1), "mono8", "squashed"),
        (RoiConfig(), (480, 640, 3), (64, 64, 1), "mono8", "delivers 3 channels"),
    ],
)
def test_a_camera_that_cannot_feed_the_model_is_refused_with_the_fix(roi, frame_shape, input_shape, fmt, fragment):
    with pytest.raises(InputMismatch, match=fragment):
        Preprocessor(roi, frame_shape, input_shape, fmt)


def test_a_frame_of_the_wrong_size_is_refused():
    prep = Preprocessor(RoiConfig(), (64, 64, 1), (64, 64, 1), "mono8")
    with pytest.raises(InputMismatch, match="frame is"):
        prep(np.zeros((32, 32, 1), np.uint8), np.empty((64, 64, 1), np.uint8))
