"""Where a verified bundle becomes the serving model: install into the store, swap in the engine, record; or roll back.

The engine loads the candidate beside the serving model, runs its canary and swaps between two
batches; only then does the store's `active` link move. A candidate that fails any check leaves
the serving model and the store's active model as they were.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq

from ..bundle import BundleError, Manifest, version_key
from ..config import AgentConfig
from ..contract import ShadowResult
from ..ipc import Receiver, Sender, endpoint
from ..messages import SwapModel, SwapResult
from ..signing import load_trusted_keys
from .store import ModelStore, label_of, store_root

log = logging.getLogger(__name__)


def request_swap(config: AgentConfig, bundle_dir: Path, *, slot: str = "", timeout_s: float = 60.0) -> SwapResult:
    """Ask the running engine to serve bundle_dir for model slot `slot`; its answer (ok, or the reason it refused)."""
    context = zmq.Context()
    replies = Receiver(context, endpoint(config.run_dir, "rollout"))
    engine = Sender(context, endpoint(config.run_dir, "engine-control"))
    try:
        if not engine.wait_connected(timeout_s=5.0):
            msg = f"no engine is listening on {engine.address}: is `lineguard-agent run` running with this config?"
            raise BundleError(msg)
        request_id = uuid.uuid4().hex
        engine.send(SwapModel(request_id=request_id, bundle_dir=str(bundle_dir.absolute()), model_slot=slot))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = replies.receive(timeout_ms=200)
            if isinstance(reply, SwapResult) and reply.request_id == request_id:
                return reply
        msg = f"the engine did not answer within {timeout_s:.0f} s; the serving model is unchanged"
        raise BundleError(msg)
    finally:
        replies.close()
        engine.close()
        context.term()


def _store(config: AgentConfig, slot: str) -> ModelStore:
    """The store of model slot `slot`, with the bundle the agent started from recorded as its first active model."""
    store = ModelStore(store_root(config.state_dir), slot=slot)
    if store.active() is None:
        trusted = load_trusted_keys(config.engine.trusted_keys)
        bundle = config.model_bundles[slot]
        initial = store.install(bundle, trusted, require_signature=config.engine.require_signature)
        store.activate(label_of(initial))
    return store


def slot_of(config: AgentConfig, model_id: str) -> str:
    """The model slot a bundle of `model_id` goes to; BundleError when no camera here is scored by that model id.

    With one model (no [[models]] configured) every bundle goes to slot "": it replaces the model of every camera.
    """
    slots = config.model_bundles
    if "" in slots:
        return ""
    if model_id not in slots:
        msg = (
            f"no camera of this agent uses model {model_id}; its cameras use model ids {', '.join(slots)} "
            "(cameras[].model in its config)"
        )
        raise BundleError(msg)
    return model_id


@dataclass(frozen=True, slots=True)
class Activation:
    """A model that now serves: its label, what happened in words (canary, shadow), and the shadow numbers."""

    label: str
    summary: str
    shadow: ShadowResult | None

    def __str__(self) -> str:
        return self.summary


def shadow_of(result: SwapResult) -> ShadowResult | None:
    """The shadow phase of a swap as the contract's record; None when no live frame was shadow-scored."""
    if result.shadow_frames <= 0:
        return None
    return ShadowResult(
        frames=result.shadow_frames,
        serving_reject_rate=result.serving_rejects / result.shadow_frames,
        candidate_reject_rate=result.candidate_rejects / result.shadow_frames,
    )


def activate(config: AgentConfig, bundle_dir: Path, *, allow_downgrade: bool = False) -> Activation:
    """Install, swap and record a new model; returns what happened (label, canary and shadow results).

    Refused (BundleError/SignatureError, saying why) when the bundle is not signed by a trusted key, is not
    meant for this agent (its signed targets) or for a model id none of its cameras uses, or is older than the
    newest version of its model id this agent has accepted, unless allow_downgrade (an operator's explicit,
    signed choice). Only the cameras of the bundle's model id change model."""
    store = ModelStore(store_root(config.state_dir))
    trusted = load_trusted_keys(config.engine.trusted_keys)

    def admit(manifest: Manifest) -> None:
        slot = slot_of(config, manifest.model_id)
        _check_targets(config, manifest, slot)
        _store(config, slot)  # the start-up bundle counts as accepted before a push is compared with it
        if not allow_downgrade:
            _check_not_older(config, store, manifest)

    manifest = store.install(bundle_dir, trusted, require_signature=config.engine.require_signature, admit=admit)
    label, slot = label_of(manifest), slot_of(config, manifest.model_id)
    store = _store(config, slot)
    result = request_swap(config, store.path(label), slot=slot)
    if not result.ok:
        store.discard(label)
        msg = f"{label} refused: {result.reason}; {result.model} keeps serving"
        raise BundleError(msg)
    store.activate(label)
    log.info("%s is serving: %s", label, result.reason)
    summary = f"{label} is serving: {result.reason}" if result.reason else f"{label} is serving"
    return Activation(label, summary, shadow_of(result))


def _check_targets(config: AgentConfig, manifest: Manifest, slot: str) -> None:
    cameras = list(config.cameras_of(slot))
    refusal = manifest.targets.refusal(line=config.line, agent_id=config.agent_id, cameras=cameras)
    if refusal:
        msg = f"{label_of(manifest)} is not meant for this agent: {refusal} (its signed targets)"
        raise BundleError(msg)


def _check_not_older(config: AgentConfig, store: ModelStore, manifest: Manifest) -> None:
    newest = store.newest_accepted(manifest.model_id)
    if newest is not None and version_key(manifest.model_version) < version_key(newest):
        msg = (
            f"{label_of(manifest)} is older than {manifest.model_id}@{newest}, the newest version this agent has "
            f"accepted; to go back on purpose: lineguard-deploy rollback --agent {config.agent_id} --to "
            f"{label_of(manifest)} (if it is still installed), or push again with --allow-downgrade"
        )
        raise BundleError(msg)


def rollback(config: AgentConfig, *, to: str = "", model_id: str = "") -> str:
    """Swap back to `to` (a label in the store) or to the previously active version of `model_id`; returns the
    label that serves. model_id may be left empty when the agent serves one model id."""
    slots = config.model_bundles
    if to:
        slot = slot_of(config, to.rpartition("@")[0])
    elif model_id or len(slots) == 1:
        slot = slot_of(config, model_id) if model_id else next(iter(slots))
    else:
        msg = f"name the model to roll back: this agent serves model ids {', '.join(slots)}"
        raise BundleError(msg)
    store = _store(config, slot)
    target = to or store.previous()
    if target is None:
        msg = f"no previous model to roll back to (active: {store.active()})"
        raise BundleError(msg)
    path = store.path(target)  # ModelStoreError when it is not installed here
    result = request_swap(config, path, slot=slot)
    if not result.ok:
        msg = f"rollback to {target} refused: {result.reason}; {result.model} keeps serving"
        raise BundleError(msg)
    store.activate(target)
    return target
