import numpy as np
import pytest

from lineguard.agent.config import RoiConfig
from lineguard.agent.model_input import InputMismatch, Preprocessor, to_model_input


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


def test_a_mono8_camera_feeds_a_colour_model_with_its_grey_in_all_three_channels():
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 1), np.uint8)
    prep = Preprocessor(RoiConfig(x=10, y=5, width=140, height=105), frame.shape, (48, 64, 3), "mono8")
    colour = prep(frame, np.empty((48, 64, 3), np.uint8))
    grey = Preprocessor(prep.roi, frame.shape, (48, 64, 1), "mono8")(frame, np.empty((48, 64, 1), np.uint8))
    for channel in range(3):
        np.testing.assert_array_equal(colour[:, :, channel], grey[:, :, 0])


def test_an_image_whose_channels_contradict_its_pixel_format_is_refused():
    with pytest.raises(InputMismatch, match=r"a rgb8 image is uint8 \(H, W, 3\)"):
        to_model_input(np.zeros((8, 8), np.uint8), pixel_format="rgb8", input_shape=(8, 8, 3))


def test_a_misshapen_output_buffer_is_refused():
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        to_model_input(np.zeros((8, 8), np.uint8), pixel_format="mono8", input_shape=(4, 4, 1), out=np.empty((4, 4)))


@pytest.mark.parametrize(
    ("roi", "frame_shape", "input_shape", "fmt", "fragment"),
    [
        (RoiConfig(x=600, width=100), (480, 640, 1), (64, 64, 1), "mono8", "does not fit"),
        (RoiConfig(), (480, 640, 1), (64, 64, 2), "mono8", "takes 2 channels"),
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
