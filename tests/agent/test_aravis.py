"""GigE Vision through Aravis against a real arv-fake-gv-camera-0.8 on loopback (skipped where it is missing).

The fake camera fills Mono8 frames with (x + y + frame_id) % 255 (at exposure 10000 µs and gain 0; other values
scale it), so every byte of every frame is checked: a torn, stale or mixed-up buffer cannot pass.
"""

from __future__ import annotations

import itertools
import sys
import time
from contextlib import closing

import numpy as np
import pytest
from fake_camera import ADDRESS

from lineguard.agent.capture import CameraError, CameraUnavailable, aravis, open_source
from lineguard.agent.capture.aravis import AravisSource, FrameIdTracker, _import_aravis, frame_id_gap
from lineguard.agent.config import CameraConfig

H, W = 480, 640


# -- no camera needed ----------------------------------------------------------------------------------------------


def test_frame_id_gaps_follow_the_16_bit_counter_that_skips_zero():
    assert frame_id_gap(10, 11) == 0
    assert frame_id_gap(10, 14) == 3
    assert frame_id_gap(65535, 1) == 0  # wrap: 0 is reserved
    assert frame_id_gap(65534, 2) == 2  # 65535 and 1 missing
    assert frame_id_gap(65535, 0) == 0  # a camera that does use 0
    assert frame_id_gap(10, 10) == 0 and frame_id_gap(10, 9) == 0  # repeat or step back: no gap invented
    assert frame_id_gap(10000, 5) == 0  # a jump back: the counter was reset
    assert frame_id_gap(70000, 70003) == 2  # 64-bit extended ids


def test_broken_buffers_count_against_the_next_gap():
    tracker = FrameIdTracker()
    assert tracker.good(100) == 0
    tracker.broken()
    assert tracker.good(105) == 3  # 101..104 missing, one of them arrived broken
    assert tracker.good(106) == 0


def test_a_missing_pygobject_is_a_camera_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)
    with pytest.raises(CameraError, match=r"pip install 'lineguard\[gige\]'"):
        _import_aravis()


# -- against the fake camera ---------------------------------------------------------------------------------------


def gige(**fields: object) -> CameraConfig:
    """Every parameter explicit: the fake camera keeps what an earlier test set."""
    values = {"address": ADDRESS, "width_px": W, "height_px": H, "pixel_format": "mono8", "exposure_us": 10000.0}
    return CameraConfig(source="gige", **{**values, "gain_db": 0.0, "acquisition_fps": 25.0, **fields})


def pattern(frame_id: int, height: int = H, width: int = W) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x + y + frame_id) % 255).astype(np.uint8)[:, :, None]


def test_mono8_frames_match_the_fake_camera_pattern_byte_for_byte(fake_camera):
    with closing(open_source(gige())) as source:
        assert isinstance(source, AravisSource)
        assert (source.height, source.width, source.channels) == (H, W, 1)
        out = np.empty((H, W, 1), np.uint8)
        frame_ids, camera_times, not_ok = [], [], 0
        for _ in range(50):
            before = time.monotonic_ns()
            info = source.read_into(out, timeout_s=2.0)
            assert info is not None
            if not info.ok:  # a lost packet on a loaded machine: reported, never passed off as a frame
                not_ok += 1
                continue
            assert before - 1_000_000_000 < info.t_capture_ns <= time.monotonic_ns()
            assert np.array_equal(out, pattern(info.camera_frame_id)), (
                f"frame {info.camera_frame_id} is not its pattern"
            )
            frame_ids.append(info.camera_frame_id)
            camera_times.append(info.camera_timestamp_ns)
    assert not_ok <= 2
    assert all(frame_id_gap(a, b) < 5 and a != b for a, b in itertools.pairwise(frame_ids))
    # The camera's own clock rides along (a PLC pairs it with its encoder): rising, about 40 ms apart at 25 fps.
    assert min(camera_times) > 0, camera_times
    gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(camera_times)]
    assert all(0 < gap < 1000 for gap in gaps_ms), gaps_ms


def test_rgb8_frames_arrive_with_three_channels(fake_camera):
    with closing(open_source(gige(pixel_format="rgb8", width_px=320, height_px=240))) as source:
        assert (source.height, source.width, source.channels) == (240, 320, 3)
        out = np.zeros((240, 320, 3), np.uint8)
        info = source.read_into(out, timeout_s=2.0)
        assert info is not None and info.ok and out.any()


def test_software_trigger_delivers_one_frame_per_trigger(fake_camera):
    with closing(open_source(gige(trigger="software"))) as source:
        out = np.empty((H, W, 1), np.uint8)
        infos = [source.read_into(out, timeout_s=2.0) for _ in range(4)]
        time.sleep(0.5)  # free-running at 25 fps this would be a dozen frames
        infos.append(source.read_into(out, timeout_s=2.0))
    assert all(info is not None and info.ok and info.missed_before == 0 for info in infos)
    ids = [info.camera_frame_id for info in infos]
    assert all(frame_id_gap(a, b) == 0 for a, b in itertools.pairwise(ids)), ids
    assert np.array_equal(out, pattern(ids[-1]))


def test_settings_the_camera_cannot_take_are_camera_errors(fake_camera):
    with pytest.raises(CameraError, match="BGR8 not offered"):
        open_source(gige(pixel_format="bgr8"))
    with pytest.raises(CameraError, match=r"exposure_us = 1000000000\.0 is outside"):
        open_source(gige(exposure_us=1e9))


def test_acquisition_fps_sets_a_free_running_camera_s_frame_rate_within_its_range(fake_camera):
    with closing(open_source(gige(acquisition_fps=5.0))) as source:
        out = np.empty((H, W, 1), np.uint8)
        ids = [info.camera_frame_id for _ in range(4) if (info := source.read_into(out, timeout_s=2.0)) is not None]
        started = time.monotonic()
        for _ in range(5):
            assert source.read_into(out, timeout_s=2.0) is not None
        # 5 frames at 5 fps take ~1 s; at the fake camera's default 25 fps they would take 0.2 s.
        assert time.monotonic() - started > 0.6, ids
    with pytest.raises(CameraError, match=r"acquisition_fps = 5000\.0 is outside the camera's range"):
        open_source(gige(acquisition_fps=5000.0))


def test_no_camera_at_the_address_is_unavailable(fake_camera):
    with pytest.raises(CameraUnavailable, match=r"no GigE Vision camera answers at 127\.0\.0\.9"):
        open_source(gige(address="127.0.0.9"))


def test_a_free_running_camera_that_answers_but_sends_nothing_is_unavailable(fake_camera, monkeypatch):
    # Short enough to test, long enough for a loaded machine's first frame (the limit runs from AcquisitionStart).
    monkeypatch.setattr(aravis, "_FREE_RUN_SILENCE_S", 2.0)
    with closing(open_source(gige())) as source:
        out = np.empty((H, W, 1), np.uint8)
        assert source.read_into(out, timeout_s=1.9) is not None
        source._camera.stop_acquisition()  # stands in for a blocked stream: GVCP answers, no GVSP arrives
        stopped = time.monotonic()
        with pytest.raises(CameraUnavailable, match="answers but sent no frame"):
            while time.monotonic() - stopped < 10:
                source.read_into(out, timeout_s=0.2)


def test_killing_the_camera_raises_camera_unavailable_within_about_two_seconds(fake_camera):
    source = open_source(gige())
    try:
        out = np.empty((H, W, 1), np.uint8)
        for _ in range(3):
            assert source.read_into(out, timeout_s=2.0) is not None
        fake_camera.kill()
        killed = time.monotonic()
        with pytest.raises(CameraUnavailable, match=r"unanswered|failed|lost control"):
            while time.monotonic() - killed < 10:
                source.read_into(out, timeout_s=0.2)
        assert time.monotonic() - killed < 2.5  # ~1.7 s: 0.5 s of silence, then a register read given 1.2 s
    finally:
        start = time.monotonic()
        source.close()
        assert time.monotonic() - start < 0.5  # the lost camera is released in the background
        fake_camera.start()  # fresh camera for any test after this one
