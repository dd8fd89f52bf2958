"""EngineLoop in-process: load shedding, over real ipc sockets and a real frame ring.

The model is a stand-in (a ServingModel needs a trained, signed bundle): constant scores, and a count of the
frames that reached it, so a test can tell a frame that was scored from one that was failed unscored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lineguard.agent.engine.backends import Inference
from lineguard.agent.engine.process import EngineLoop
from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import FrameReady, Scored, ScoreFailed

SHAPE = (32, 32, 1)


@dataclass
class CountingModel:
    """The members of ServingModel that EngineLoop uses; scores every frame 0.0 and counts frames per batch."""

    label: str = "double@1"
    threshold: float = 1.0
    score_scale: float = 1.0
    input_shape: tuple[int, int, int] = SHAPE
    backend: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(name="double"))
    backend_summary: str = "test double"
    batches: list[int] = field(default_factory=list)
    shapes: set[tuple[int, ...]] = field(default_factory=set)  # the batches' frame shapes (N left out)

    def infer(self, frames: np.ndarray) -> Inference:
        self.batches.append(len(frames))
        self.shapes.add(frames.shape[1:])

        def maps(rows: Sequence[int]) -> np.ndarray:
            return np.zeros((len(rows), *self.input_shape[:2]), np.float32)

        return Inference(np.zeros(len(frames), np.float32), maps)

    def attach_region(self, key: str, region: object) -> bool:
        return False  # no GPU path: frames are prepared on the host

    def close(self) -> None:
        pass


@dataclass
class Harness:
    loop: EngineLoop
    model: CountingModel
    to_engine: Sender
    decision: Receiver
    capture: object  # conftest.CaptureSide
    answers: list[Scored | ScoreFailed] = field(default_factory=list)

    def step_until(self, n_answers: int, *, timeout_s: float = 5.0) -> None:
        """Step the engine until n_answers Scored/ScoreFailed reached decision, then once more."""
        end = time.monotonic() + timeout_s
        while len(self.answers) < n_answers:
            assert time.monotonic() < end, f"only {len(self.answers)} answers after {timeout_s} s"
            self.loop.step()
            self._collect()
        self.loop.step()
        self._collect()

    def _collect(self) -> None:
        messages = self.decision.receive_batch(100, timeout_ms=10)
        self.answers += [m for m in messages if isinstance(m, Scored | ScoreFailed)]


@pytest.fixture
def engine(loop_config, capture_side, zmq_context) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*, deadline_ms: float, max_batch: int = 8) -> Harness:
        config = loop_config(deadline_ms=deadline_ms, max_batch=max_batch)
        decision = Receiver(
            zmq_context, endpoint(config.run_dir, "decision")
        )  # bound first: the engine's sender connects
        model = CountingModel()
        loop = EngineLoop(config, {"": model}, zmq_context)  # type: ignore[arg-type]
        to_engine = Sender(zmq_context, endpoint(config.run_dir, "engine"))
        assert to_engine.wait_connected(timeout_s=5.0)
        made.append(Harness(loop, model, to_engine, decision, capture_side(config)))
        return made[-1]

    yield make
    for harness in made:
        harness.to_engine.close()
        harness.loop.close()
        harness.decision.close()


def test_frames_that_would_be_scored_past_their_deadline_are_failed_unscored(engine):
    h = engine(deadline_ms=400.0)
    h.loop.expected_batch_ns[""] = 100_000_000  # the engine has measured ~100 ms per batch
    ages_ms = {1: 0.0, 2: 150.0, 3: 350.0, 4: 600.0}  # 3 and 4: age + 100 ms > 400 ms
    for seq, age_ms in ages_ms.items():
        assert h.to_engine.send(h.capture.frame(seq, age_ms=age_ms))
    h.step_until(4)
    assert sorted(a.seq for a in h.answers) == [1, 2, 3, 4]  # one answer per frame, none twice
    assert sorted(a.seq for a in h.answers if isinstance(a, Scored)) == [1, 2]
    failed = {a.seq: a.reason for a in h.answers if isinstance(a, ScoreFailed)}
    assert sorted(failed) == [3, 4]
    assert all(reason.startswith("engine behind: frame") for reason in failed.values()), failed
    assert sum(h.model.batches) == 2  # the shed frames never reached the model


def test_an_engine_that_keeps_up_scores_every_frame_in_time(engine):
    h = engine(deadline_ms=400.0)
    for seq in range(1, 6):
        assert h.to_engine.send(h.capture.frame(seq, age_ms=50.0))
    h.step_until(5)
    assert sorted(a.seq for a in h.answers if isinstance(a, Scored)) == [1, 2, 3, 4, 5]
    assert sum(h.model.batches) == 5


def test_each_camera_is_scored_by_its_own_model_in_batches_of_one_model(loop_config, capture_side, zmq_context):
    from lineguard.agent.capture.process import ring_name
    from lineguard.agent.config import CameraConfig, ModelConfig
    from lineguard.agent.ring import ShmRing

    base = loop_config(deadline_ms=2000.0, max_batch=4)
    config = base.model_copy(
        update={
            "models": (ModelConfig(id="brick", bundle=Path("/b")), ModelConfig(id="cap", bundle=Path("/c"))),
            "cameras": (CameraConfig(name="cam0", model="brick"), CameraConfig(name="cam1", model="cap")),
        }
    )
    decision = Receiver(zmq_context, endpoint(config.run_dir, "decision"))
    brick, cap = CountingModel(label="brick@1"), CountingModel(label="cap@7", input_shape=(16, 16, 1))
    loop = EngineLoop(config, {"brick": brick, "cap": cap}, zmq_context)  # type: ignore[dict-item]
    to_engine = Sender(zmq_context, endpoint(config.run_dir, "engine"))
    cam0 = capture_side(config)
    cam1 = ShmRing.create(ring_name(config.agent_id, "cam1"), slot_count=8, slot_shape=SHAPE, dtype=np.uint8)
    try:
        assert to_engine.wait_connected(timeout_s=5.0)
        for seq in range(1, 5):
            assert to_engine.send(cam0.frame(seq))
            slot = cam1.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10**12)
            assert slot is not None
            cam1.publish(slot, seq, t_capture_ns=time.monotonic_ns())
            assert to_engine.send(FrameReady("cam1", seq, cam1.name, slot, time.monotonic_ns(), *SHAPE))
        answers: list[Scored | ScoreFailed] = []
        end = time.monotonic() + 5
        while len(answers) < 8 and time.monotonic() < end:
            loop.step()
            answers += [m for m in decision.receive_batch(100, timeout_ms=10) if isinstance(m, Scored | ScoreFailed)]
        assert all(isinstance(a, Scored) for a in answers) and len(answers) == 8, answers
        assert {(a.camera, a.model) for a in answers} == {("cam0", "brick@1"), ("cam1", "cap@7")}
        assert sorted((a.camera, a.seq) for a in answers) == [(c, s) for c in ("cam0", "cam1") for s in range(1, 5)]
        assert sum(brick.batches) == 4 and sum(cap.batches) == 4  # no frame scored by the other model
        assert brick.shapes == {SHAPE} and cap.shapes == {(16, 16, 1)}  # each model gets its own input size
        assert {a.map_ring for a in answers if a.camera == "cam1"} == {f"lg-{config.agent_id}-maps-cap"}
    finally:
        to_engine.close()
        loop.close()
        decision.close()
        cam1.close()
