"""Agent fixtures: Aravis's fake GigE Vision camera, a bundle with a (fake) TensorRT engine, held frame-plan builds,
and what driving one process loop in-process needs: a config, capture's ring, a ZeroMQ context (brokers are in
tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from agent_process import AgentProcess
from bundle_tools import with_fake_engine
from fake_camera import FakeCamera, require_fake_camera
from fake_gpu import FakeBuilder

from lineguard.agent.capture.process import ring_name
from lineguard.agent.config import AgentConfig, CameraConfig, DecisionConfig, EngineConfig, MetricsConfig, RingConfig
from lineguard.agent.messages import FrameReady
from lineguard.agent.ring import ShmRing


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCamera]:
    """A fresh arv-fake-gv-camera-0.8 on 127.0.0.1 for one test module (its state persists while it lives)."""
    require_fake_camera()
    camera = FakeCamera(tmp_path_factory.mktemp("fake-camera") / "fake-camera.log")
    camera.start()
    yield camera
    camera.kill()


@pytest.fixture
def bundle_with_engine(trained_work: Path, signing_key: Path, tmp_path: Path) -> Path:
    """A copy of the trained bundle with a (fake) fp16 TensorRT engine for an H200, batch <= 4, signed."""
    return with_fake_engine(trained_work / "bundle", tmp_path / "bundle", signing_key)


class HeldBuilds:
    """Fake TensorRT builds that wait for `release` (a build that takes long); `started` is set when one waits."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()


@pytest.fixture
def held_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBuilds]:
    """Every FakeBuilder build waits until the test sets `release`; released, and its threads joined, at teardown."""
    held = HeldBuilds()
    build = FakeBuilder.build_serialized_network

    def wait_then_build(self: FakeBuilder, network: Any, config: Any) -> Any:
        held.started.set()
        if not held.release.wait(60):
            msg = "the test never released the held build"
            raise TimeoutError(msg)
        return build(self, network, config)

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", wait_then_build)
    yield held
    held.release.set()  # a build left waiting would hold up every later one (one build at a time)
    for thread in threading.enumerate():
        if thread.name == "frame-plan-build":
            thread.join(60)


# -- one process loop driven in-process: real ipc sockets and shared-memory rings, no subprocess ----------------------

FRAME_SHAPE = (32, 32, 1)  # the camera frames (and the test models' input) of the loop tests


@pytest.fixture
def loop_config(tmp_path: Path) -> Iterator[Callable[..., AgentConfig]]:
    """Makes an AgentConfig for one camera "cam0" with a short run dir (Unix socket paths are short) and an agent
    id of its own (shared-memory names are global to the machine: other test runs may be running)."""
    run_dir = Path(tempfile.mkdtemp(prefix="lg-"))
    agent_id = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def make(*, deadline_ms: float = 250.0, max_batch: int = 4, shadow_s: float = 0.0) -> AgentConfig:
        return AgentConfig(
            agent_id=agent_id,
            run_dir=run_dir,
            state_dir=tmp_path / "state",
            cameras=(CameraConfig(name="cam0"),),
            ring=RingConfig(slots=8),
            engine=EngineConfig(max_batch=max_batch, shadow_s=shadow_s),
            decision=DecisionConfig(deadline_ms=deadline_ms),
            metrics=MetricsConfig(port=0),
        )

    yield make
    shutil.rmtree(run_dir, ignore_errors=True)


class CaptureSide:
    """Capture's half of camera cam0 for loop tests: its ring (created here) and its FrameReady records."""

    def __init__(self, config: AgentConfig) -> None:
        name = ring_name(config.agent_id, "cam0")
        self.ring = ShmRing.create(name, slot_count=config.ring.slots, slot_shape=FRAME_SHAPE, dtype=np.uint8)

    def frame(self, seq: int, *, age_ms: float = 0.0) -> FrameReady:
        """Write frame `seq` into a ring slot, captured age_ms ago, and return its announcement."""
        t_capture_ns = time.monotonic_ns() - int(age_ms * 1e6)
        slot = self.ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12)
        assert slot is not None, "the test ring is full: release slots or use fewer frames"
        self.ring.array(slot)[...] = seq % 256
        self.ring.publish(slot, seq, t_capture_ns=t_capture_ns)
        height, width, channels = FRAME_SHAPE
        return FrameReady(
            camera="cam0",
            seq=seq,
            ring=self.ring.name,
            slot=slot,
            t_capture_ns=t_capture_ns,
            height=height,
            width=width,
            channels=channels,
        )


@pytest.fixture
def capture_side() -> Iterator[Callable[[AgentConfig], CaptureSide]]:
    """Opens CaptureSide objects; their rings are closed (and unlinked) at teardown."""
    opened: list[CaptureSide] = []

    def open_side(config: AgentConfig) -> CaptureSide:
        opened.append(CaptureSide(config))
        return opened[-1]

    yield open_side
    for side in opened:
        side.ring.close()


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


# -- the whole agent as a user runs it (helpers in test_pipeline.py) ----------------------------------------------


@pytest.fixture(scope="module")
def replay(trained_work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, int, float]]]:
    """The test split's images in one folder, in a known order, with the trainer's label and score for each."""
    from test_pipeline import replay_of

    return replay_of(trained_work, tmp_path_factory.mktemp("replay"))


@pytest.fixture
def start_agent() -> Iterator:
    """start(config) runs `lineguard-agent run` as systemd would: its READY=1 comes to a notify socket, so a test
    that must not disturb start-up (a worker killed then stops the agent) can `wait_ready()` first."""
    started: list[AgentProcess] = []

    def start(config: Path) -> AgentProcess:
        agent = AgentProcess(config)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.release()
