"""The MQTT contract: every topic (topics.py) and every payload (a frozen, typed, versioned record), in one place.

ZeroMQ between the agent's own processes has its contract in agent/messages.py; this package is the
boundary with everything else on the broker (actuators, dashboards, operators, PLC gateways). Build
topics with `Topics`, encode with `record.encode()`, decode with `decode(RecordType, payload)`, which
raises ContractError and nothing else. JSON Schema files for integrators who are not Python are in
schemas/, generated from these records (`python -m lineguard.agent.contract.schema_files --write`).
"""

from .actuator import REJECT_REASONS, ActuatorStatus, RejectReason
from .codec import SCHEMA_VERSION, ContractError, Part, Record, clip, decode, decode_object
from .line import (
    FAILSAFE_CAUSES,
    AgentStatus,
    Backend,
    CameraStatus,
    FailsafeCause,
    Health,
    HeatmapInfo,
    Latency,
    Verdict,
)
from .model_change import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    ModelCommand,
    ModelEvent,
    ShadowResult,
    TransferAck,
    TransferMeta,
    TransferState,
)
from .samples import LabelKind, SampleKind, SampleLabel, SampleLabelResult, SampleRecord
from .topics import ANY, CHANNELS, Channel, PushTopics, TopicMatch, Topics, check_prefix

RECORDS: tuple[type[Record], ...] = (
    Verdict,
    HeatmapInfo,
    AgentStatus,
    ModelEvent,
    ModelCommand,
    TransferMeta,
    TransferAck,
    SampleRecord,
    SampleLabel,
    SampleLabelResult,
    ActuatorStatus,
)

__all__ = [
    "ANY",
    "CHANNELS",
    "FAILSAFE_CAUSES",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "RECORDS",
    "REJECT_REASONS",
    "SCHEMA_VERSION",
    "ActuatorStatus",
    "AgentStatus",
    "Backend",
    "CameraStatus",
    "Channel",
    "ContractError",
    "FailsafeCause",
    "Health",
    "HeatmapInfo",
    "LabelKind",
    "Latency",
    "ModelCommand",
    "ModelEvent",
    "Part",
    "PushTopics",
    "Record",
    "RejectReason",
    "SampleKind",
    "SampleLabel",
    "SampleLabelResult",
    "SampleRecord",
    "ShadowResult",
    "TopicMatch",
    "Topics",
    "TransferAck",
    "TransferMeta",
    "TransferState",
    "Verdict",
    "check_prefix",
    "clip",
    "decode",
    "decode_object",
]
