"""Every record that crosses a process boundary, with one encoding and a schema version.

Pixels never travel in these messages: frames and anomaly maps stay in shared-memory ring
slots, and a message names the slot and the sequence number the reader must find there.
Encoding is compact JSON tagged with the type name and the schema version; decoding refuses
anything else with a MessageError that says what was wrong.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import pydantic_core

from .contract import FAILSAFE_CAUSES, clip

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # every record here is small; anything larger is refused before parsing


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
    resent: bool = False  # capture sent it again to a restarted decision process


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
    resent: bool = False

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
    """any process -> supervisor: alive, with how much work is waiting, and what keeps it from its job.

    problem: "" when the process does its job; else what fails (e.g. the engine cannot attach camera X's ring).
    camera: the camera the problem concerns, "" for none; the supervisor restarts that camera's capture.
    """

    process: str
    pid: int
    t_ns: int
    queue_depth: int = 0
    problem: str = ""
    camera: str = ""


@dataclass(frozen=True, slots=True)
class Published:
    """decision -> capture-<camera>: the broker holds the verdicts of `seqs` ("3-7,9"); capture may forget them.

    Sent as acknowledgements arrive and at least every second. `instance` names the decision process: when it
    changes, decision restarted, and capture sends again every record it still holds (FrameReady.resent).
    """

    camera: str
    instance: str
    seqs: str


@dataclass(frozen=True, slots=True)
class SwapModel:
    """model manager -> engine: load the bundle at bundle_dir beside the one serving `model_slot`, canary it, swap.

    model_slot: the model id whose cameras the bundle is for ("" = the agent's one model, every camera).
    """

    request_id: str
    bundle_dir: str
    model_slot: str = ""


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
    problem: str = ""  # what keeps the engine from scoring some frames ("" = nothing), for the health state


Message = (
    FrameReady | FrameFailed | Scored | ScoreFailed | Heartbeat | Published | SwapModel | SwapResult | EngineStatus
)

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        FrameReady,
        FrameFailed,
        Scored,
        ScoreFailed,
        Heartbeat,
        Published,
        SwapModel,
        SwapResult,
        EngineStatus,
    )
}
MAX_RANGES_CHARS = 8192  # one Published message; more acknowledgements go in the next one


def encode_ranges(seqs: list[int]) -> list[str]:
    """Sorted seqs as "a-b,c" range strings, each at most MAX_RANGES_CHARS long."""
    parts: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if parts and parts[-1][1] == seq - 1:
            parts[-1][1] = seq
        else:
            parts.append([seq, seq])
    texts = [f"{a}-{b}" if a != b else str(a) for a, b in parts]
    out: list[str] = []
    for text in texts:
        if out and len(out[-1]) + len(text) + 1 <= MAX_RANGES_CHARS:
            out[-1] += "," + text
        else:
            out.append(text)
    return out


_RANGE = re.compile(r"^([0-9]{1,18})(?:-([0-9]{1,18}))?$")


def decode_ranges(text: str) -> list[tuple[int, int]]:
    """(first, last) pairs of an encode_ranges string; MessageError for anything else."""
    pairs = []
    for part in text.split(",") if text else []:
        match = _RANGE.match(part)
        if match is None or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            msg = f"bad sequence range {clip(part, 40)!r}"
            raise MessageError(msg)
        pairs.append((int(match.group(1)), int(match.group(2) or match.group(1))))
    return pairs


def encode(message: Message) -> bytes:
    """Serialise a message record."""
    body = dataclasses.asdict(message)
    body["_t"] = type(message).__name__
    body["_v"] = SCHEMA_VERSION
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """Parse bytes from encode(); MessageError (only) on anything malformed, oversized or too deeply nested."""
    if len(data) > MAX_MESSAGE_BYTES:
        msg = f"message is {len(data)} bytes, over {MAX_MESSAGE_BYTES}: is another program writing to this endpoint?"
        raise MessageError(msg)
    try:
        body = pydantic_core.from_json(data, allow_inf_nan=True)  # NaN: a model's unusable score travels as such
    except ValueError as error:
        msg = f"message is not JSON ({clip(str(error), 100)}); is another program writing to this endpoint?"
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
        msg = f"{name} message has wrong fields: {clip(str(error), 200)}"
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
            msg = f"{name}.{field.name} must be {field.type}, got {clip(repr(value), 60)}"
            raise MessageError(msg)
