"""Push a model bundle from an operator to one agent over MQTT: checksummed chunks, resumable, QoS 1.

The protocol (topics, acks, resume) is described in lineguard.agent.transfer.protocol. Modules by job:
protocol (messages, topics, constants, errors, make_client), archive (pack, check, unpack, read_model_id),
sender (BundleSender, operator side) and receiver (BundleReceiver, agent side).
"""

from lineguard.agent.transfer.archive import pack_bundle, read_model_id, unpack_bundle
from lineguard.agent.transfer.protocol import (
    CHUNK_BYTES,
    MAX_ARCHIVE_BYTES,
    Ack,
    ArchiveError,
    PushTopics,
    TransferError,
    TransferMeta,
    make_client,
    push_topics,
)
from lineguard.agent.transfer.receiver import BundleReceiver, OnBundle
from lineguard.agent.transfer.sender import BundleSender, ProgressCallback, TransferProgress, TransferResult

__all__ = [
    "CHUNK_BYTES",
    "MAX_ARCHIVE_BYTES",
    "Ack",
    "ArchiveError",
    "BundleReceiver",
    "BundleSender",
    "OnBundle",
    "ProgressCallback",
    "PushTopics",
    "TransferError",
    "TransferMeta",
    "TransferProgress",
    "TransferResult",
    "make_client",
    "pack_bundle",
    "push_topics",
    "read_model_id",
    "unpack_bundle",
]
