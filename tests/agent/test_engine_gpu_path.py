"""The engine loop on the TensorRT back end's GPU frame path, against the fake GPU (tests/fake_gpu.py).

Real parts: the trained bundle (its fake engine runs the model's ONNX graph), a shared-memory frame ring,
ZeroMQ sockets and EngineLoop.step(). The frame engine is built in the background; until then a camera's
frames are scored on the CPU path, then they go from the ring slot to the (fake) GPU and score the same.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from fake_gpu import FakeBuilder, FakeCudart, FakeTensorRT, install
from skimage import data

from lineguard.agent.config import AgentConfig, CameraConfig, DecisionConfig, EngineConfig, RoiConfig
from lineguard.agent.engine.model import load_serving_model
from lineguard.agent.engine.process import EngineLoop
from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import FrameReady, Scored, ScoreFailed
from lineguard.agent.ring import ShmRing
from lineguard.agent.signing import public_key_path

FRAME = (480, 640, 1)  # mono8 camera frames; the model sees a 400x400 ROI resized to 256x256
ROI = RoiConfig(x=120, y=40, width=400, height=400)
N_FRAMES = 4  # = engine.max_batch


@dataclass
class Line:
    """An engine loop with one camera's ring of published frames, its input socket and decision's."""

    loop: EngineLoop
    cudart: FakeCudart
    ring: ShmRing
    to_engine: Sender
    decision: Receiver

    def score(self) -> np.ndarray:
        """Announce the ring's frames (seq 1..N) and step the engine until each is scored: (N,) scores by seq."""
        now_ns = time.monotonic_ns()
        for slot in range(N_FRAMES):
            ready = FrameReady("cam0", slot + 1, self.ring.name, slot, now_ns, *FRAME)
            assert self.to_engine.send(ready)
        scores: dict[int, float] = {}
        deadline_s = time.monotonic() + 60
        while len(scores) < N_FRAMES:
            assert time.monotonic() < deadline_s, f"only {sorted(scores)} of {N_FRAMES} frames scored"
            self.loop.step()
            for message in self.decision.receive_batch(100, timeout_ms=100):
                assert not isinstance(message, ScoreFailed), message.reason
                if isinstance(message, Scored):
                    scores[message.seq] = message.score
        return np.array([scores[seq] for seq in range(1, N_FRAMES + 1)])

    def frames_by_path(self) -> tuple[int, int]:
        """(frames whose ROI went straight from the ring slot, frames the CPU prepared) since the last call."""
        from_slots = sum(1 for kind, _ in self.cudart.copies if kind == "to_device_2d")
        staged = sum(nbytes for kind, nbytes in self.cudart.copies if kind == "to_device") // (256 * 256)
        self.cudart.copies.clear()
        return from_slots, staged


@pytest.fixture
def line(
    bundle_with_engine: Path, signing_key: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory
) -> Iterator[Line]:
    cudart = FakeCudart()
    install(monkeypatch, cudart, FakeTensorRT(cudart))
    run_dir = tmp_path_factory.mktemp("run")  # short: socket paths are limited to ~100 bytes
    config = AgentConfig(
        agent_id=f"gpu-path-{os.getpid()}",
        run_dir=run_dir,
        state_dir=run_dir / "state",
        cameras=(CameraConfig(name="cam0", pixel_format="mono8", roi=ROI),),
        engine=EngineConfig(
            bundle=bundle_with_engine, trusted_keys=(public_key_path(signing_key),), max_batch=N_FRAMES
        ),
        decision=DecisionConfig(deadline_ms=600_000),  # this test is about the path, not about speed
    )
    model = load_serving_model(config, bundle_with_engine)  # frame plans in state_dir/engines
    assert model.backend.name == "tensorrt"
    context = zmq.Context()
    decision = Receiver(context, endpoint(run_dir, "decision"))
    loop = EngineLoop(config, {"": model}, context)
    ring = ShmRing.create(f"lg-{config.agent_id}-cam0", slot_count=N_FRAMES, slot_shape=FRAME, dtype=np.uint8)
    photo = cv2.resize(data.brick(), (FRAME[1], FRAME[0]))
    for slot in range(N_FRAMES):
        assert ring.acquire(slot + 1, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12) == slot
        ring.array(slot)[..., 0] = np.roll(photo, 37 * slot, axis=(0, 1))
        ring.publish(slot, slot + 1, t_capture_ns=time.monotonic_ns())
    to_engine = Sender(context, endpoint(run_dir, "engine"))
    assert to_engine.wait_connected(10) and loop.to_decision.wait_connected(10)
    cudart.copies.clear()  # the warm-up and canary ran at load
    yield Line(loop, cudart, ring, to_engine, decision)
    to_engine.close()
    loop.close()
    decision.close()
    ring.close()
    context.term()


def test_frames_are_scored_on_the_cpu_while_the_frame_engine_builds_and_alike_from_ring_slots_after(line, held_builds):
    on_the_cpu = line.score()  # the first batch starts the build, which waits for held_builds.release
    assert held_builds.started.wait(30)
    assert line.frames_by_path() == (0, N_FRAMES)
    # Still building: the CPU path again, and no frame failed (score() asserts that).
    np.testing.assert_allclose(line.score(), on_the_cpu, rtol=1e-6)
    assert line.frames_by_path() == (0, N_FRAMES)
    held_builds.release.set()
    assert line.loop.models[""].backend.wait_for_frame_plans(timeout_s=60)
    on_the_gpu = line.score()
    assert line.frames_by_path() == (N_FRAMES, 0)
    np.testing.assert_allclose(on_the_gpu, on_the_cpu, rtol=1e-3)


def test_a_frame_engine_that_fails_to_build_leaves_the_camera_on_the_cpu_path_with_one_warning(
    line, monkeypatch, caplog
):
    monkeypatch.setattr(FakeBuilder, "build_serialized_network", lambda self, network, config: None)
    with caplog.at_level(logging.WARNING):
        first = line.score()
        assert line.loop.models[""].backend.wait_for_frame_plans(timeout_s=60)
        for _ in range(2):
            np.testing.assert_allclose(line.score(), first, rtol=1e-6)
    assert line.frames_by_path() == (0, 3 * N_FRAMES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cam0: no GPU crop and resize" in warnings[0], warnings
    assert "could not build the frame engine" in warnings[0]
