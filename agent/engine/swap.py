"""Model changes in the engine: a candidate loads beside the serving model, shadow-scores, then takes over.

The model manager sends SwapModel on the engine's control socket, naming the model slot (model id) it is for.
The candidate loads on a background thread (ModelSwap: signature, digests, back end, golden-image canary), so
scoring never waits for it; it must take the input shape of the model serving its slot; then it scores that
slot's live frames beside the serving model for engine.shadow_s (Shadow) and replaces it. Every step happens
between two batches (ModelChanges.between_batches), so each frame is scored by exactly one model, only the
cameras of that slot change model, and the manager gets one SwapResult per request. One change at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..bundle import BundleError
from ..config import AgentConfig
from ..ipc import Receiver, Sender
from ..messages import SwapModel, SwapResult
from ..signing import SignatureError
from .backends import BackendUnavailable
from .background import lower_thread_priority
from .model import ServingModel, load_serving_model

log = logging.getLogger(__name__)


class ModelChanges:
    """Answers swap requests between batches: load, check, shadow-test, switch over; one SwapResult each."""

    def __init__(self, config: AgentConfig, *, control: Receiver, to_manager: Sender) -> None:
        self.config, self.control, self.to_manager = config, control, to_manager
        self.loading = ModelSwap(config)
        self.shadow: Shadow | None = None

    def shadowing(self, slot: str) -> bool:
        """True while a candidate scores beside slot's serving model: its batches must then be prepared on the host."""
        return self.shadow is not None and self.shadow.request.model_slot == slot

    def observe(self, frames: np.ndarray, serving_scores: np.ndarray, *, serving_threshold: float) -> None:
        """Let the shadow candidate score the batch the serving model just scored. frames: (N, h, w, c) uint8."""
        if self.shadow is not None:
            self.shadow.observe(frames, serving_scores, serving_threshold=serving_threshold)

    def between_batches(self, serving: dict[str, ServingModel]) -> dict[str, ServingModel]:
        """Take a request, a finished load and a finished shadow phase; returns the models that serve next
        (model slot -> model; a new dict when one slot changed)."""
        request = self.control.receive(timeout_ms=0)
        if isinstance(request, SwapModel):
            self._start(request, serving)
        finished = self.loading.poll()
        if finished is not None:
            request, candidate, reason = finished
            if not self._begin_shadow(request, candidate, reason, serving=serving[request.model_slot]):
                return serving
        shadow = self.shadow
        if shadow is not None and shadow.done():
            self.shadow = None
            slot = shadow.request.model_slot
            return {**serving, slot: self._switch(shadow, serving[slot])}
        return serving

    def _start(self, request: SwapModel, serving: dict[str, ServingModel]) -> None:
        current = serving.get(request.model_slot)
        if current is None:
            served = ", ".join(repr(slot) for slot in serving)
            reason = f"model slot {request.model_slot!r} is not served by this engine (it serves {served})"
            self._reply(request, ok=False, model=next(iter(serving.values())).label, reason=reason)
            return
        refusal = "another model is being shadow-tested; try again when it has finished" if self.shadow else ""
        refusal = refusal or self.loading.start(request)
        if refusal:
            self._reply(request, ok=False, model=current.label, reason=refusal)

    def _begin_shadow(
        self, request: SwapModel, candidate: ServingModel | None, reason: str, *, serving: ServingModel
    ) -> bool:
        """Start the shadow phase of a loaded candidate; False (and the refusal sent) if it cannot serve."""
        slot = request.model_slot
        if candidate is not None and slot and candidate.manifest.model_id != slot:
            reason = f"the bundle is model {candidate.manifest.model_id}, not {slot}, the model it was sent for"
            candidate.close()
            candidate = None
        if candidate is not None and candidate.input_shape != serving.input_shape:
            reason = f"input {candidate.input_shape} differs from the serving model's {serving.input_shape}"
            candidate.close()
            candidate = None
        if candidate is None:
            self._reply(request, ok=False, model=serving.label, reason=reason)
            return False
        self.shadow = Shadow(request, candidate, until_ns=time.monotonic_ns() + int(self.config.engine.shadow_s * 1e9))
        return True

    def _switch(self, shadow: Shadow, serving: ServingModel) -> ServingModel:
        """The shadow phase is over: the candidate serves, the old model closes."""
        summary = shadow.summary(serving)
        serving.close()
        log.info("swapped model: %s -> %s (%s)", serving.label, shadow.candidate.label, summary)
        self._reply(shadow.request, ok=True, model=shadow.candidate.label, reason=summary, shadow=shadow)
        return shadow.candidate

    def _reply(self, request: SwapModel, *, ok: bool, model: str, reason: str, shadow: Shadow | None = None) -> None:
        counts = (shadow.frames, shadow.serving_rejects, shadow.candidate_rejects) if shadow else (0, 0, 0)
        self.to_manager.send(SwapResult(request.request_id, ok, model, reason, *counts))

    def close(self) -> None:
        self.control.close()
        self.to_manager.close()


class Shadow:
    """A loaded candidate scoring live frames beside the serving model before it takes over.

    Its scores are never published; they predict how the reject rate will change. With
    engine.shadow_s = 0 the phase ends at once and only the golden-image canary applies.
    """

    def __init__(self, request: SwapModel, candidate: ServingModel, *, until_ns: int) -> None:
        self.request, self.candidate, self.until_ns = request, candidate, until_ns
        self.frames = self.serving_rejects = self.candidate_rejects = 0

    def observe(self, frames: np.ndarray, serving_scores: np.ndarray, *, serving_threshold: float) -> None:
        candidate_scores = self.candidate.infer(frames).scores
        self.frames += len(frames)
        self.serving_rejects += int(np.count_nonzero(serving_scores >= serving_threshold))
        self.candidate_rejects += int(np.count_nonzero(candidate_scores >= self.candidate.threshold))

    def done(self) -> bool:
        return time.monotonic_ns() >= self.until_ns

    def summary(self, serving: ServingModel) -> str:
        if not self.frames:
            return f"canary passed ({self.candidate.canary.n_images} golden images); no live frames shadow-scored"
        before, after = 100 * self.serving_rejects / self.frames, 100 * self.candidate_rejects / self.frames
        return (
            f"canary passed; shadow-scored {self.frames} live frames: reject rate {before:.1f} % with "
            f"{serving.label} -> {after:.1f} % predicted with {self.candidate.label}"
        )


class ModelSwap:
    """Loads a candidate model on a background thread, so scoring never waits for a model to load."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._thread: threading.Thread | None = None
        self._result: tuple[SwapModel, ServingModel | None, str] | None = None

    def start(self, request: SwapModel) -> str:
        """Begin loading; returns a refusal reason, or "" when loading started."""
        if self._thread is not None:
            return "another model is still loading; try again when it has finished"
        self._thread = threading.Thread(target=self._load, args=(request,), name="model-swap", daemon=True)
        self._thread.start()
        return ""

    def _load(self, request: SwapModel) -> None:
        lower_thread_priority("the candidate model's loading")  # the serving model keeps the CPU
        try:
            candidate = load_serving_model(self.config, Path(request.bundle_dir))
            self._result = (request, candidate, "")
        except (BundleError, SignatureError, BackendUnavailable) as error:
            self._result = (request, None, str(error))
        except Exception as error:  # noqa: BLE001 - any failure of a candidate (e.g. its graph rejects its own input spec) refuses it
            self._result = (request, None, f"the candidate cannot run: {error}")

    def poll(self) -> tuple[SwapModel, ServingModel | None, str] | None:
        """The finished load, once; None while loading or idle."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        return result
