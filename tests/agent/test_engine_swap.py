"""engine/swap.py's ModelChanges between batches: refusals, the shadow phase, the switch-over; one reply each.

Candidates are stand-ins (a ServingModel needs a trained, signed bundle): loading one is replaced by a lookup.
The control and reply sockets are real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from lineguard.agent.engine import swap
from lineguard.agent.engine.swap import ModelChanges
from lineguard.agent.ipc import Receiver, Sender, endpoint
from lineguard.agent.messages import SwapModel, SwapResult


@dataclass
class StandInModel:
    """The members of ServingModel that the swap uses; every frame scores `score`."""

    label: str
    input_shape: tuple[int, int, int] = (32, 32, 1)
    threshold: float = 1.0
    score: float = 0.0
    canary: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(n_images=3))
    closed: bool = False

    def infer(self, frames: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(scores=np.full(len(frames), self.score, np.float32))

    def close(self) -> None:
        self.closed = True


@dataclass
class Harness:
    changes: ModelChanges
    to_control: Sender
    replies: Receiver
    candidates: dict[str, StandInModel]

    def request(self, bundle: str) -> None:
        assert self.to_control.send(SwapModel(request_id=f"req-{bundle}", bundle_dir=bundle))

    def run(
        self, serving: StandInModel, *, until_replies: int, timeout_s: float = 5.0
    ) -> tuple[StandInModel, list[SwapResult]]:
        """Call between_batches until until_replies SwapResults came back; (the model serving then, the replies)."""
        replies: list[SwapResult] = []
        end = time.monotonic() + timeout_s
        while len(replies) < until_replies:
            assert time.monotonic() < end, f"replies so far: {replies}"
            serving = self.changes.between_batches({"": serving})[""]  # type: ignore[dict-item]
            message = self.replies.receive(timeout_ms=5)
            if isinstance(message, SwapResult):
                replies.append(message)
        return serving, replies


@pytest.fixture
def changes(loop_config, zmq_context, monkeypatch) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*, shadow_s: float = 0.0, **candidates: StandInModel) -> Harness:
        config = loop_config(shadow_s=shadow_s)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(swap, "load_serving_model", lambda _config, path: candidates[path.name])
        replies = Receiver(zmq_context, endpoint(config.run_dir, "rollout"))
        control = Receiver(zmq_context, endpoint(config.run_dir, "engine-control"))
        to_manager = Sender(zmq_context, endpoint(config.run_dir, "rollout"))
        to_control = Sender(zmq_context, endpoint(config.run_dir, "engine-control"))
        assert to_control.wait_connected(timeout_s=5.0) and to_manager.wait_connected(timeout_s=5.0)
        made.append(
            Harness(ModelChanges(config, control=control, to_manager=to_manager), to_control, replies, candidates)
        )
        return made[-1]

    yield make
    for harness in made:
        harness.changes.close()
        harness.to_control.close()
        harness.replies.close()


def test_a_candidate_that_passed_its_canary_serves_from_the_next_batch_and_the_old_model_closes(changes):
    old, new = StandInModel("brick@1"), StandInModel("brick@2")
    h = changes(v2=new)
    h.request("v2")
    serving, replies = h.run(old, until_replies=1)
    assert serving is new and old.closed and not new.closed
    assert [(r.request_id, r.ok, r.model) for r in replies] == [("req-v2", True, "brick@2")]
    assert "canary passed (3 golden images)" in replies[0].reason


def test_a_candidate_for_another_input_size_is_refused_and_closed_while_the_old_model_serves(changes):
    old, wide = StandInModel("brick@1"), StandInModel("brick@2", input_shape=(32, 64, 1))
    h = changes(v2=wide)
    h.request("v2")
    serving, replies = h.run(old, until_replies=1)
    assert serving is old and wide.closed and not old.closed
    assert [(r.ok, r.model) for r in replies] == [(False, "brick@1")]
    assert "differs from the serving model's (32, 32, 1)" in replies[0].reason


def test_shadow_scoring_predicts_the_reject_rate_and_a_second_request_meanwhile_is_refused(changes):
    old, new = StandInModel("brick@1", score=0.0), StandInModel("brick@2", score=5.0)
    h = changes(shadow_s=1.0, v2=new, v3=StandInModel("brick@3"))
    h.request("v2")
    while not h.changes.shadowing(""):
        assert h.changes.between_batches({"": old}) == {"": old}  # type: ignore[dict-item]
    h.changes.observe(np.zeros((4, 32, 32, 1), np.uint8), np.zeros(4, np.float32), serving_threshold=1.0)
    h.request("v3")
    serving, replies = h.run(old, until_replies=2)
    assert serving is new
    assert [(r.request_id, r.ok) for r in replies] == [("req-v3", False), ("req-v2", True)]
    assert "being shadow-tested" in replies[0].reason
    assert "shadow-scored 4 live frames: reject rate 0.0 % with brick@1 -> 100.0 % predicted" in replies[1].reason
    assert (replies[1].shadow_frames, replies[1].serving_rejects, replies[1].candidate_rejects) == (4, 0, 4)
    assert (replies[0].shadow_frames, replies[0].serving_rejects) == (0, 0)  # a refusal carries no shadow numbers
