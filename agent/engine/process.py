"""Engine process: FrameReady -> check slot, crop/resize -> micro-batch inference -> Scored.

Each camera is scored by its model (cameras[].model; one serving model per model slot); a micro-batch
holds frames of one model, from any of its cameras (agent/engine/batching.py).

Crop and resize run on the GPU where the back end offers it (TensorRT with engine.gpu_preprocess:
only slot addresses go to the back end), else on the CPU into a batch buffer (agent/model_input.py).
A batch goes the GPU way only when every camera in it is attached; while a camera's frame engine is
still being built (in the background), its batches take the CPU way.

Receive, act, send. Frames already past their deadline are not scored (decision has failed
them), so an engine that fell behind catches up instead of falling further behind. Anomaly
maps go into the engine's own map ring; only their slot numbers travel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import zmq

from ..config import AgentConfig
from ..decision.rules import rows_needing_maps
from ..ipc import Receiver, Sender, endpoint
from ..messages import EngineStatus, FrameReady, Heartbeat, Scored, ScoreFailed
from ..model_input import InputMismatch, Preprocessor
from ..ring import AttachedRings, RingError, RingMissing, ShmRing, StaleSlotError
from ..rollout.store import serving_bundles
from ..samples.policy import SamplePolicy
from .backends import Inference, RingRegion, SlotAddress
from .batching import Batch, take_batch
from .model import ServingModel, load_serving_model
from .swap import ModelChanges

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
STATUS_S = 0.25  # EngineStatus to decision: how soon decision can tell a dead engine from a late one
ATTACH_PROBLEM_S = 5.0  # a camera whose ring cannot be read this long is a problem the supervisor acts on


@dataclass(slots=True)
class _Job:
    ready: FrameReady
    index: int  # row in the batch buffer


class EngineLoop:
    """Scores frames announced by the capture processes, each camera with its model (one per model slot)."""

    def __init__(self, config: AgentConfig, models: dict[str, ServingModel], context: zmq.Context) -> None:
        """models: model slot -> its serving model, for every slot in config.model_bundles."""
        missing = sorted(set(config.model_bundles) - set(models))
        if missing:
            msg = f"no serving model for model slot(s) {missing}"
            raise ValueError(msg)
        self.config, self.models = config, models
        self.frames = Receiver(context, endpoint(config.run_dir, "engine"))
        self.swap = ModelChanges(
            config,
            control=Receiver(context, endpoint(config.run_dir, "engine-control")),
            to_manager=Sender(context, endpoint(config.run_dir, "rollout")),
        )
        self.to_decision = Sender(context, endpoint(config.run_dir, "decision"))
        self.to_supervisor = Sender(context, endpoint(config.run_dir, "supervisor"))
        self.slot_of = {camera.name: camera.model for camera in config.cameras}
        self.batches: dict[str, np.ndarray] = {}  # slot -> (max_batch, h, w, c) uint8 host batch buffer
        self.map_rings: dict[str, ShmRing] = {}  # slot -> its anomaly maps (each model has its own map size)
        for slot, model in models.items():
            height, width, channels = model.input_shape
            self.batches[slot] = np.empty((config.engine.max_batch, height, width, channels), np.uint8)
            self.map_rings[slot] = ShmRing.create(
                map_ring_name(config.agent_id, slot),
                slot_count=config.ring.slots * max(len(config.cameras_of(slot)), 1),
                slot_shape=(height, width),
                dtype=np.float32,
            )
        self.rings = AttachedRings()
        self.preprocessors: dict[tuple[str, tuple[int, int, int]], Preprocessor] = {}
        self.cameras = {camera.name: camera for camera in config.cameras}
        self.deadline_ns = int(config.decision.deadline_ms * 1e6)
        self.backlog: deque[FrameReady] = deque()
        self.expected_batch_ns: dict[str, int] = dict.fromkeys(models, 0)  # per slot: models differ in cost
        self._next_heartbeat = 0.0
        self._next_status = 0.0
        self.unreadable: dict[str, tuple[float, str]] = {}  # camera -> (since, why) its ring cannot be read
        # samples hook (agent/samples): the maps of close calls and random picks are kept with their samples
        self.sample_policy = SamplePolicy.of(config.samples, config.agent_id) if config.samples.enabled else None

    def step(self) -> None:
        self._collect()
        batch = self._take_batch()
        jobs, slots = self._load(batch.slot, batch.frames)
        if jobs:
            self._score(batch.slot, jobs, slots)
        self.models = self.swap.between_batches(self.models)  # model changes only here: one model per frame
        self._heartbeat()

    def _collect(self) -> None:
        """Move every announced frame into the backlog; wait briefly only when there is nothing to do."""
        max_batch = self.config.engine.max_batch
        wait_ms = 0 if self.backlog else 200
        self.backlog.extend(m for m in self.frames.receive_batch(4096, timeout_ms=wait_ms) if isinstance(m, FrameReady))
        if self.backlog and len(self.backlog) < max_batch and self.config.engine.batch_wait_ms > 0:
            more = self.frames.receive_batch(
                max_batch - len(self.backlog), timeout_ms=int(self.config.engine.batch_wait_ms)
            )
            self.backlog.extend(m for m in more if isinstance(m, FrameReady))

    def _take_batch(self) -> Batch:
        """One model's frames, oldest first (agent/engine/batching.py); frames that cannot be scored before their
        deadline are failed at once.

        Scoring a frame that will miss its deadline anyway spends the engine on a failsafe and
        makes the next frame late too; under overload that turns into a collapse.
        """
        batch = take_batch(
            self.backlog,
            self.slot_of,
            max_batch=self.config.engine.max_batch,
            now_ns=time.monotonic_ns(),
            deadline_ns=self.deadline_ns,
            expected_batch_ns=self.expected_batch_ns,
        )
        for ready, age_ns in batch.late:
            expected_ms = self.expected_batch_ns[self.slot_of[ready.camera]] / 1e6
            reason = f"engine behind: frame {age_ns / 1e6:.0f} ms old, scoring takes ~{expected_ms:.0f} ms"
            self._fail(ready, reason, cause="engine-late")
        return batch

    def _load(self, slot: str, frames: list[FrameReady]) -> tuple[list[_Job], list[SlotAddress] | None]:
        """Check each announced frame's slot (failing those that cannot be scored) and hand the rest on.

        Returns the jobs, and on the GPU frame path the slots the back end reads itself; None: each
        ROI was converted and resized into the batch buffer on the CPU.
        """
        found: list[tuple[FrameReady, ShmRing, np.ndarray, Preprocessor]] = []
        if not frames:
            return [], None
        model, buffer = self.models[slot], self.batches[slot]  # every configured slot has both (__init__)
        for ready in frames:
            try:
                ring = self.rings.get(ready.ring)
                pixels = ring.read(ready.slot, ready.seq)
                found.append((ready, ring, pixels, self._preprocessor(ready, pixels.shape, model.input_shape)))
                self.unreadable.pop(ready.camera, None)
            except (RingError, InputMismatch) as error:
                self._fail(ready, str(error), cause=_cause_of(error))
                if isinstance(error, RingMissing):
                    self.unreadable.setdefault(ready.camera, (time.monotonic(), str(error)))
        # A shadow-tested candidate scores the same model-size frames on the host: that batch takes the CPU path.
        # Each camera in the batch is asked once (a list, not a short-circuit), so each starts building its
        # frame engine at once.
        regions = {ready.camera: RingRegion(ring, prep.box, prep.source_format) for ready, ring, _, prep in found}
        on_gpu = not self.swap.shadowing(slot) and all([model.attach_region(key, reg) for key, reg in regions.items()])
        if on_gpu:
            slots = [SlotAddress(ready.camera, ring.address(ready.slot)) for ready, ring, _, _ in found]
            return [_Job(ready, index) for index, (ready, *_) in enumerate(found)], slots
        jobs: list[_Job] = []
        for ready, _, pixels, prep in found:
            prep(pixels, buffer[len(jobs)])
            jobs.append(_Job(ready, len(jobs)))
        return jobs, None

    def _score(self, slot: str, jobs: list[_Job], addresses: list[SlotAddress] | None) -> None:
        model, frames = self.models[slot], self.batches[slot][: len(jobs)]
        started = time.monotonic_ns()
        inference = model.infer(frames) if addresses is None else model.infer_slots(addresses)
        scores = inference.scores
        finished = time.monotonic_ns()
        # Moving estimate of one batch's time of this model, including the per-frame work around it.
        self.expected_batch_ns[slot] = int(0.8 * self.expected_batch_ns[slot] + 0.2 * (finished - started))
        map_slots = self._publish_maps(slot, jobs, inference, now_ns=finished)
        if self.swap.shadowing(slot):  # _load took the CPU path: the slot's batch buffer holds this batch
            self.swap.observe(frames, scores, serving_threshold=model.threshold)
        map_ring = self.map_rings[slot].name
        for job in jobs:
            ready, map_slot = job.ready, map_slots.get(job.index)
            self.to_decision.send(
                Scored(
                    camera=ready.camera,
                    seq=ready.seq,
                    score=float(scores[job.index]),
                    map_ring=map_ring,
                    map_slot=-1 if map_slot is None else map_slot,
                    model=model.label,
                    t_engine_start_ns=started,
                    t_engine_end_ns=finished,
                )
            )

    def _publish_maps(self, slot: str, jobs: list[_Job], inference: Inference, *, now_ns: int) -> dict[int, int]:
        """Put the maps decision will read (rejects, sampled heatmaps) into the slot's map ring: {batch row: map slot}."""
        decision, model, map_ring = self.config.decision, self.models[slot], self.map_rings[slot]
        override = self.config.threshold_override(slot)
        threshold = override if override is not None else model.threshold
        rows = rows_needing_maps(
            inference.scores,
            threshold=threshold,
            min_defect_area_px=decision.min_defect_area_px,
            heatmap=decision.heatmap,
        )
        if self.sample_policy is not None:  # samples hook: close calls and random picks need their maps too
            frames = [(job.ready.camera, job.ready.seq) for job in jobs]
            kept = self.sample_policy.map_rows(inference.scores, frames, threshold=threshold, scale=model.score_scale)
            rows = sorted({*rows, *kept})
        if not rows:
            return {}
        maps = inference.maps(rows)
        slots = {}
        for row, anomaly_map in zip(rows, maps, strict=True):
            ready = jobs[row].ready
            map_slot = map_ring.acquire(ready.seq, now_ns=now_ns, reclaim_after_ns=2 * self.deadline_ns)
            if map_slot is not None:
                map_ring.array(map_slot)[...] = anomaly_map
                map_ring.publish(map_slot, ready.seq, t_capture_ns=ready.t_capture_ns)
                slots[row] = map_slot
        return slots

    def _preprocessor(
        self, ready: FrameReady, frame_shape: tuple[int, ...], input_shape: tuple[int, int, int]
    ) -> Preprocessor:
        # A swap keeps each slot's input shape (swap.py), so a camera's preprocessor stays valid across swaps.
        key = (ready.camera, (frame_shape[0], frame_shape[1], frame_shape[2]))
        preprocessor = self.preprocessors.get(key)
        if preprocessor is None:
            camera = self.cameras[ready.camera]
            preprocessor = Preprocessor(camera.roi, key[1], input_shape, camera.pixel_format)
            self.preprocessors[key] = preprocessor
        return preprocessor

    def _fail(self, ready: FrameReady, reason: str, *, cause: str) -> None:
        self.to_decision.send(ScoreFailed(camera=ready.camera, seq=ready.seq, reason=reason, cause=cause))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_status:
            return
        self._next_status = now + STATUS_S
        # Repeated, so a restarted decision process learns it too; a small message four times a second.
        camera, problem = self.problem(now)
        models = list(self.models.values())
        status = EngineStatus(
            model=",".join(model.label for model in models),
            backend=models[0].backend.name,
            detail="; ".join(f"{model.label}: {model.backend_summary}" for model in models)
            if len(models) > 1
            else models[0].backend_summary,
            problem=problem,
        )
        self.to_decision.send(status)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            self.to_supervisor.send(
                Heartbeat(process="engine", pid=os.getpid(), t_ns=time.monotonic_ns(), problem=problem, camera=camera)
            )

    def problem(self, now: float) -> tuple[str, str]:
        """(camera, what keeps the engine from scoring its frames), or ("", "") when nothing does."""
        for camera, (since, error) in sorted(self.unreadable.items()):
            if now - since >= ATTACH_PROBLEM_S:
                return camera, f"cannot read camera {camera}'s frames for {now - since:.0f} s: {error[:200]}"
        return "", ""

    def close(self) -> None:
        self.rings.close()
        for map_ring in self.map_rings.values():
            map_ring.close()
        self.frames.close()
        self.swap.close()
        self.to_decision.close()
        self.to_supervisor.close()
        for model in self.models.values():
            model.close()


def _cause_of(error: Exception) -> str:
    """The failsafe cause of a frame the engine could not read or convert."""
    if isinstance(error, RingMissing):
        return "ring-missing"
    if isinstance(error, StaleSlotError):
        return "slot-overwritten"
    return "engine-error"


def map_ring_name(agent_id: str, slot: str) -> str:
    """The shared-memory ring of the anomaly maps of model slot `slot`."""
    return f"lg-{agent_id}-maps-{slot}" if slot else f"lg-{agent_id}-maps"


def run(config: AgentConfig, stop: threading.Event) -> int:
    """The engine process body; returns the exit code."""
    models: dict[str, ServingModel] = {}
    try:
        for slot, bundle in serving_bundles(config).items():
            models[slot] = load_serving_model(config, bundle)
    except BaseException:
        for model in models.values():
            model.close()
        raise
    context = zmq.Context()
    loop = EngineLoop(config, models, context)
    try:
        while not stop.is_set():
            loop.step()
    finally:
        loop.close()
        context.term()
    return 0
