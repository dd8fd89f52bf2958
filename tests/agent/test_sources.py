"""Frame sources without a camera: image folders, video files, the USB "device absent" path, the source table."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.agent.capture import CameraError, CameraUnavailable, FrameInfo, SourceExhausted, open_source
from lineguard.agent.capture.folder import FolderSource
from lineguard.agent.capture.opencv import RtspSource, VideoFileSource, _redact
from lineguard.agent.capture.replay import ReplayClock
from lineguard.agent.config import CameraConfig

H, W = 24, 32
# (B, G, R) per frame: flat colours survive JPEG almost exactly.
COLOURS = [(10, 120, 230), (200, 60, 20), (90, 90, 90), (30, 220, 140), (160, 10, 100), (250, 250, 5)]


def frame(index: int, height: int = H, width: int = W) -> np.ndarray:
    return np.full((height, width, 3), COLOURS[index % len(COLOURS)], np.uint8)


def grey(bgr: tuple[int, int, int]) -> int:
    return int(cv2.cvtColor(np.array([[bgr]], np.uint8), cv2.COLOR_BGR2GRAY)[0, 0])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five PNGs written in shuffled order; sorted by name they are frames 0..4."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index in (3, 0, 4, 1, 2):
        cv2.imwrite(str(folder / f"img_{index:02d}.png"), frame(index))
    (folder / "notes.txt").write_text("not an image")
    return folder


def folder_config(folder: Path, **fields: object) -> CameraConfig:
    return CameraConfig(source="folder", address=str(folder), **{"fps": 1000.0, **fields})


def read(source, timeout_s: float = 1.0) -> tuple[FrameInfo, np.ndarray]:
    out = np.zeros((source.height, source.width, source.channels), np.uint8)
    info = source.read_into(out, timeout_s=timeout_s)
    assert info is not None
    return info, out


def test_a_folder_replays_its_images_in_name_order_as_mono8(image_folder):
    with closing(open_source(folder_config(image_folder))) as source:
        assert isinstance(source, FolderSource)
        assert (source.height, source.width, source.channels) == (H, W, 1)
        for index in range(5):
            info, out = read(source)
            assert info.ok and info.camera_frame_id == index and info.missed_before == 0
            assert np.all(out == grey(COLOURS[index]))


def test_a_folder_converts_to_rgb8_and_bgr8(image_folder):
    for pixel_format, expected in (("rgb8", COLOURS[0][::-1]), ("bgr8", COLOURS[0])):
        with closing(open_source(folder_config(image_folder, pixel_format=pixel_format))) as source:
            info, out = read(source)
            assert info.ok and out.shape == (H, W, 3)
            assert np.all(out == np.array(expected, np.uint8))


def test_a_folder_replays_at_the_configured_rate(image_folder):
    with closing(open_source(folder_config(image_folder, fps=20.0))) as source:
        start = time.monotonic()
        stamps = [read(source)[0].t_capture_ns for _ in range(5)]
        elapsed = time.monotonic() - start
    assert 0.18 < elapsed < 0.6  # four periods of 50 ms after the first frame
    gaps_ms = np.diff(stamps) / 1e6
    assert np.all(gaps_ms > 40) and np.all(gaps_ms < 150)


def test_a_frame_not_yet_due_times_out_with_none(image_folder):
    with closing(open_source(folder_config(image_folder, fps=2.0))) as source:
        read(source)
        out = np.zeros((H, W, 1), np.uint8)
        start = time.monotonic()
        assert source.read_into(out, timeout_s=0.05) is None
        assert time.monotonic() - start < 0.2


def test_a_looping_folder_starts_again_and_keeps_counting(image_folder):
    with closing(open_source(folder_config(image_folder, loop=True))) as source:
        infos, values = zip(*(read(source) for _ in range(12)), strict=True)
    assert [info.camera_frame_id for info in infos] == list(range(12))
    assert [int(out[0, 0, 0]) for out in values] == [grey(COLOURS[i % 5]) for i in range(12)]


def test_a_folder_without_loop_is_exhausted_after_its_last_image(image_folder):
    with closing(open_source(folder_config(image_folder))) as source:
        for _ in range(5):
            read(source)
        with pytest.raises(SourceExhausted, match="replayed all 5 images"):
            read(source)


def test_a_broken_or_odd_sized_image_is_a_not_ok_frame_with_its_reason(image_folder):
    (image_folder / "img_01.png").write_bytes(b"\x89PNG but not really")
    cv2.imwrite(str(image_folder / "img_02.png"), frame(2, height=10, width=12))
    with closing(open_source(folder_config(image_folder))) as source:
        infos = [read(source)[0] for _ in range(5)]
    assert [info.ok for info in infos] == [True, False, False, True, True]
    assert infos[1].reason == "cannot decode image img_01.png"
    assert infos[2].reason == f"img_02.png is 12x10, expected {W}x{H}"


def test_a_missing_or_empty_folder_is_a_camera_error(tmp_path):
    with pytest.raises(CameraError, match="is not a directory"):
        open_source(folder_config(tmp_path / "absent"))
    with pytest.raises(CameraError, match="is not a directory"):
        open_source(CameraConfig(source="folder", address=""))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="holds no images"):
        open_source(folder_config(tmp_path / "empty"))


def test_read_into_refuses_an_array_of_the_wrong_shape_or_layout(image_folder):
    with closing(open_source(folder_config(image_folder))) as source:
        with pytest.raises(ValueError, match=r"shape \(24, 32, 1\)"):
            source.read_into(np.zeros((H, W, 3), np.uint8), timeout_s=1)
        with pytest.raises(ValueError, match="not C-contiguous"):
            source.read_into(np.zeros((H, W * 2, 1), np.uint8)[:, ::2], timeout_s=1)


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    """A six-frame MJPG AVI of flat colours, 64x48."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 48))
    for index in range(6):
        writer.write(frame(index, height=48, width=64))
    writer.release()
    return path


def video_config(path: Path, **fields: object) -> CameraConfig:
    return CameraConfig(source="video", address=str(path), **{"fps": 1000.0, **fields})


@pytest.mark.parametrize("pixel_format", ["mono8", "rgb8", "bgr8"])
def test_a_video_file_replays_in_the_configured_pixel_format(video_file, pixel_format):
    with closing(open_source(video_config(video_file, pixel_format=pixel_format))) as source:
        assert isinstance(source, VideoFileSource)
        assert (source.height, source.width) == (48, 64)
        for index in range(6):
            info, out = read(source)
            assert info.ok and info.camera_frame_id == index
            bgr = COLOURS[index]
            expected = {"mono8": [grey(bgr)], "rgb8": bgr[::-1], "bgr8": bgr}[pixel_format]
            assert np.abs(out.astype(int) - np.array(expected)).max() <= 4  # JPEG


def test_a_video_file_paces_loops_and_ends(video_file):
    with closing(open_source(video_config(video_file, fps=50.0, loop=True))) as source:
        start = time.monotonic()
        infos = [read(source)[0] for _ in range(10)]
        elapsed = time.monotonic() - start
    assert [info.camera_frame_id for info in infos] == list(range(10)) and all(info.ok for info in infos)
    assert 0.15 < elapsed < 0.6  # nine periods of 20 ms
    with closing(open_source(video_config(video_file))) as source:
        for _ in range(6):
            read(source)
        with pytest.raises(SourceExhausted, match="ended after 6 frames"):
            read(source)


def test_a_missing_video_file_is_a_camera_error(tmp_path):
    with pytest.raises(CameraError, match="does not exist"):
        open_source(video_config(tmp_path / "absent.avi"))


def test_a_stream_delivers_without_pacing_and_its_end_is_camera_unavailable(video_file):
    config = CameraConfig(source="rtsp", address=str(video_file), fps=1.0, pixel_format="bgr8")
    with closing(open_source(config)) as source:
        assert isinstance(source, RtspSource)
        start = time.monotonic()
        for _ in range(6):
            assert read(source)[0].ok
        assert time.monotonic() - start < 1.0  # not paced at fps = 1
        with pytest.raises(CameraUnavailable, match="stopped"):
            read(source)


def test_stream_passwords_stay_out_of_messages():
    assert _redact("rtsp://admin:secret@10.0.0.5:554/s1") == "rtsp://admin:***@10.0.0.5:554/s1"
    assert _redact("rtsp://10.0.0.5/s1") == "rtsp://10.0.0.5/s1"


@pytest.mark.parametrize(
    ("address", "where"), [("", "/dev/video0"), ("3", "/dev/video3"), ("/dev/video7", "/dev/video7")]
)
def test_an_absent_usb_camera_is_unavailable_with_what_to_check(address, where):
    # This kernel has no V4L2 at all: only the "device absent" path can run here.
    with pytest.raises(CameraUnavailable, match=f"cannot open USB camera {where} through V4L2.*plugged in"):
        open_source(CameraConfig(source="usb", address=address))


def test_the_replay_clock_re_anchors_instead_of_bursting_after_a_stall():
    clock = ReplayClock(50.0)  # 20 ms period
    assert clock.wait(0) is True
    clock.advance()
    assert clock.wait(0) is False  # next one is 20 ms away
    time.sleep(0.1)  # the reader stalls for five periods
    assert clock.wait(0) is True
    clock.advance()
    assert clock.wait(0) is False  # no burst of the missed frames
    with pytest.raises(ValueError, match="> 0"):
        ReplayClock(0)
