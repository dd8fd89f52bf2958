"""Every record that crosses a process boundary, with one encoding and a schema version.

Pixels never travel in these messages: frames and anomaly maps stay in shared-memory ring
slots, and a message names the slot and the sequence number the reader must find there.
Encoding is compact JSON tagged with the type name and the schema version; decoding refuses
anything else with a MessageError that says what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .contract import FAILSAFE_CAUSES

SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A message could not be decoded: not JSON, unknown type, wrong version, bad fields."""


@dataclass(frozen=True, slots=True)
class FrameReady:
    """capture -> engine, decision: a frame sits in slot `slot` of shared-memory ring `ring`, header seq `seq`."""

    camera: str
    seq: int
    ring: str
    slot: int
    t_capture_ns: int
    height: int
    width: int
    channels: int
    camera_frame_id: int = -1
    camera_timestamp_ns: int = -1  # the camera's own clock, where the source gives one


def _check_cause(record: object, cause: str) -> None:
    if cause not in FAILSAFE_CAUSES:
        msg = f"{type(record).__name__}.cause {cause!r} is not one of {', '.join(FAILSAFE_CAUSES)}"
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class FrameFailed:
    """capture -> decision: frame `seq` was captured (or should have been) but cannot be scored.

    cause: one of agent.contract.FAILSAFE_CAUSES, naming the component that failed.
    """

    camera: str
    seq: int
    t_capture_ns: int
    reason: str
    cause: str
    camera_frame_id: int = -1
    camera_timestamp_ns: int = -1

    def __post_init__(self) -> None:
        _check_cause(self, self.cause)


@dataclass(frozen=True, slots=True)
class Scored:
    """engine -> decision: the model's result for one frame; its map is in slot `map_slot` of `map_ring` (-1: none)."""

    camera: str
    seq: int
    score: float
    map_ring: str
    map_slot: int
    model: str
    t_engine_start_ns: int
    t_engine_end_ns: int


@dataclass(frozen=True, slots=True)
class ScoreFailed:
    """engine -> decision: the engine could not score frame `seq` (stale slot, wrong size, runtime error).

    cause: one of agent.contract.FAILSAFE_CAUSES, naming the component that failed.
    """

    camera: str
    seq: int
    reason: str
    cause: str

    def __post_init__(self) -> None:
        _check_cause(self, self.cause)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """any process -> supervisor: alive, with how much work is waiting."""

    process: str
    pid: int
    t_ns: int
    queue_depth: int = 0


@dataclass(frozen=True, slots=True)
class SwapModel:
    """model manager -> engine: load the bundle at bundle_dir beside the serving one, canary it, swap."""

    request_id: str
    bundle_dir: str


@dataclass(frozen=True, slots=True)
class SwapResult:
    """engine -> model manager: whether the swap happened; `model` is what serves now.

    shadow_frames > 0: live frames both models scored before the swap (engine.shadow_s), with how many each
    would have rejected at its own threshold: the predicted change of the reject rate.
    """

    request_id: str
    ok: bool
    model: str
    reason: str
    shadow_frames: int = 0
    serving_rejects: int = 0
    candidate_rejects: int = 0


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """engine -> decision, every second: which model serves on which back end, and why (for the status topic)."""

    model: str
    backend: str
    detail: str


Message = FrameReady | FrameFailed | Scored | ScoreFailed | Heartbeat | SwapModel | SwapResult | EngineStatus

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (FrameReady, FrameFailed, Scored, ScoreFailed, Heartbeat, SwapModel, SwapResult, EngineStatus)
}


def encode(message: Message) -> bytes:
    """Serialise a message record."""
    body = dataclasses.asdict(message)
    body["_t"] = type(message).__name__
    body["_v"] = SCHEMA_VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """Parse bytes from encode(); MessageError on anything malformed."""
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"message is not JSON ({error}); is another program writing to this endpoint?"
        raise MessageError(msg) from error
    if not isinstance(body, dict):
        msg = f"message must be a JSON object, got {type(body).__name__}"
        raise MessageError(msg)
    name, version = body.pop("_t", None), body.pop("_v", None)
    if version != SCHEMA_VERSION:
        msg = f"message schema version {version!r}, expected {SCHEMA_VERSION}: agent processes of different versions?"
        raise MessageError(msg)
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        msg = f"unknown message type {name!r}; known: {', '.join(_TYPES)}"
        raise MessageError(msg)
    try:
        message = cls(**body)
    except (TypeError, ValueError) as error:
        msg = f"{name} message has wrong fields: {error}"
        raise MessageError(msg) from error
    _check_types(name, message)
    return message


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_types(name: str, message: Message) -> None:
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        expected = _FIELD_TYPES.get(str(field.type), object)
        wrong_bool = isinstance(value, bool) and str(field.type) != "bool"  # JSON true is not a number here
        if wrong_bool or not isinstance(value, expected):
            msg = f"{name}.{field.name} must be {field.type}, got {value!r}"
            raise MessageError(msg)
