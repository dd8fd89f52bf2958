"""Push a model bundle from an operator to one agent over MQTT: checksummed chunks, resumable, QoS 1.

Topics (QoS 1, never retained), with T = `<prefix>/<agent_id>/model/push/<transfer_id>`:

    T/meta                            operator -> agent  JSON TransferMeta (sizes, sha256 of the archive and of
                                                         every chunk, model id/version, push_id)
    T/chunk/<index>                   operator -> agent  raw bytes archive[index * chunk_bytes : (index + 1) * chunk_bytes]
    T/ack                             agent -> operator  JSON Ack: the answer to every meta and chunk, then the verdict
    <prefix>/<agent_id>/model/events  agent -> anyone    JSON {transfer_id, model, state, reason}: final verdicts only

Ack states: "receiving" (an answer to meta carries `missing`, [start, stop) ranges of chunk indices still
needed; an answer to a chunk carries `chunk`, plus `refused` with the reason when it was discarded), "verifying"
(every chunk is in; sha256, unpack and on_bundle run), then "received" or "failed" with `reason`.

Resume: the transfer id is the first 16 hex digits of the archive's sha256 and the archive is packed
deterministically, so pushing the same bundle again continues the same transfer. Publishing meta again is how a
sender asks what is missing: the sender does so at start, after a reconnect, and after `ask_interval_s` without
an answer, then sends only the chunks the agent lacks. The receiver keeps the archive and its chunk map on disk
(staging/<transfer_id>/archive.tar, transfer.json), so a restarted receiver resumes too. A transfer that hears
nothing for `abandon_after_s` is failed ("abandoned") and its staging folder removed; a finished one keeps only
transfer.json for that long, so a sender that missed the verdict gets it again (same push_id), while a new push
of the same bundle (new push_id) installs it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lineguard.agent.config import MqttConfig

CHUNK_BYTES = 256 * 1024
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 16 * 2**20
MAX_ARCHIVE_BYTES = 2 * 2**30  # receiver's default cap on one archive
WINDOW_CHUNKS = 8  # chunks sent and not yet acknowledged by the agent (end-to-end flow control)
MAX_REFUSALS = 3  # the agent refusing one chunk this often fails the push: the sender's data is bad
INBOX_MAX_BYTES = 64 * 2**20  # receiver drops chunks past this backlog; the sender's next ask recovers them
SESSION_EXPIRY_S = 3600  # the broker queues pushes for a receiver that is away this long
CONNECT_TIMEOUT_S = 10.0
TRANSFER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a topic level and a folder name: never ".."
AGENT_ID_PATTERN = r"^[A-Za-z0-9_-]+$"  # AgentConfig.agent_id
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

State = Literal["receiving", "verifying", "received", "failed"]


class TransferError(Exception):
    """A push failed: the agent refused it (`reason` holds its words), or it did not answer in time."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ArchiveError(Exception):
    """A bundle archive cannot be packed or is unsafe to unpack (links, devices, paths outside, too big)."""


# -- messages -------------------------------------------------------------------------------------------------


class TransferMeta(BaseModel):
    """What `T/meta` carries: enough to place, check and assemble every chunk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal[1] = 1
    transfer_id: str = Field(pattern=TRANSFER_ID_PATTERN, description="Topic level; default sha256[:16].")
    push_id: str = Field(pattern=TRANSFER_ID_PATTERN, description="Random per send(): tells a replay from a re-push.")
    total_bytes: int = Field(gt=0, description="Archive size in bytes.")
    chunk_bytes: int = Field(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES, description="Size of every chunk but the last.")
    chunk_count: int = Field(gt=0)
    sha256: str = Field(pattern=_SHA256.pattern, description="Hex sha256 of the whole archive.")
    chunk_sha256: tuple[str, ...] = Field(description="Hex sha256 of each chunk, in index order.")
    model_id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    model_version: str = Field(pattern=r"^[A-Za-z0-9._+-]+$")

    @model_validator(mode="after")
    def _consistent(self) -> TransferMeta:
        if self.chunk_count != math.ceil(self.total_bytes / self.chunk_bytes):
            msg = f"chunk_count {self.chunk_count} does not fit total_bytes {self.total_bytes} / chunk_bytes {self.chunk_bytes}"
            raise ValueError(msg)
        if len(self.chunk_sha256) != self.chunk_count or not all(_SHA256.match(each) for each in self.chunk_sha256):
            msg = f"chunk_sha256 must hold {self.chunk_count} hex sha256 digests"
            raise ValueError(msg)
        return self

    @classmethod
    def for_archive(
        cls, archive: bytes, *, model_id: str, model_version: str, chunk_bytes: int = CHUNK_BYTES
    ) -> TransferMeta:
        """Meta for `archive` cut into `chunk_bytes` chunks; a fresh push_id; ValidationError on bad values."""
        digests = tuple(
            hashlib.sha256(archive[start : start + chunk_bytes]).hexdigest()
            for start in range(0, len(archive), chunk_bytes)
        )
        sha256 = hashlib.sha256(archive).hexdigest()
        return cls(
            transfer_id=sha256[:16],
            push_id=uuid.uuid4().hex[:16],
            total_bytes=len(archive),
            chunk_bytes=chunk_bytes,
            chunk_count=len(digests),
            sha256=sha256,
            chunk_sha256=digests,
            model_id=model_id,
            model_version=model_version,
        )

    @classmethod
    def decode(cls, payload: bytes) -> TransferMeta:
        """Parse meta JSON; ValueError names each bad key."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'meta'}: {e['msg']}" for e in error.errors())
            raise ValueError(problems) from error

    @property
    def model(self) -> str:
        return f"{self.model_id}@{self.model_version}"

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_bytes, self.total_bytes - index * self.chunk_bytes)

    def same_archive(self, other: TransferMeta) -> bool:
        return self.model_dump(exclude={"push_id"}) == other.model_dump(exclude={"push_id"})


@dataclass(frozen=True, slots=True)
class Ack:
    """What `T/ack` carries (see the module docstring); defaults are left out of the JSON."""

    transfer_id: str
    state: State
    received: int = 0  # chunks the agent holds
    chunk_count: int = 0
    missing: tuple[tuple[int, int], ...] | None = None  # answer to meta: [start, stop) ranges still needed
    chunk: int | None = None  # the chunk this answers
    refused: str = ""  # why that chunk was discarded
    reason: str = ""  # the verdict's reason

    def encode(self) -> bytes:
        fields = {key: value for key, value in asdict(self).items() if value not in (None, "")}
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        """Parse ack JSON; ValueError when it is none. Keys this version does not know are ignored."""
        raw = json.loads(payload)
        if not isinstance(raw, dict) or raw.get("state") not in get_args(State) or "transfer_id" not in raw:
            msg = f"not an ack: {payload[:80]!r}"
            raise ValueError(msg)
        known = {key: raw[key] for key in cls.__dataclass_fields__ if key in raw}
        if known.get("missing") is not None:
            known["missing"] = tuple((int(start), int(stop)) for start, stop in known["missing"])
        return cls(**known)


@dataclass(frozen=True, slots=True)
class PushTopics:
    """The topics of one transfer to one agent."""

    prefix: str
    agent_id: str
    transfer_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.agent_id}/model/push/{self.transfer_id}"

    @property
    def meta(self) -> str:
        return f"{self.base}/meta"

    @property
    def ack(self) -> str:
        return f"{self.base}/ack"

    def chunk(self, index: int) -> str:
        return f"{self.base}/chunk/{index}"

    @property
    def events(self) -> str:
        return f"{self.prefix}/{self.agent_id}/model/events"  # the same as agent.mqtt.Topics.model_events


def push_topics(prefix: str, agent_id: str, transfer_id: str) -> PushTopics:
    """Topics for one transfer; ValueError when an id cannot be a single topic level."""
    for role, name, pattern in (
        ("agent id", agent_id, AGENT_ID_PATTERN),
        ("transfer id", transfer_id, TRANSFER_ID_PATTERN),
    ):
        if not re.fullmatch(pattern, name):
            msg = f"{role} {name!r} cannot be an MQTT topic level: use letters, digits, '.', '_' or '-'"
            raise ValueError(msg)
    return PushTopics(prefix, agent_id, transfer_id)


def _ranges(indices: set[int]) -> tuple[tuple[int, int], ...]:
    """Sorted half-open [start, stop) ranges covering `indices`."""
    out: list[list[int]] = []
    for index in sorted(indices):
        if out and out[-1][1] == index:
            out[-1][1] = index + 1
        else:
            out.append([index, index + 1])
    return tuple((start, stop) for start, stop in out)


def _expand(ranges: tuple[tuple[int, int], ...] | list[list[int]]) -> set[int]:
    return {index for start, stop in ranges for index in range(start, stop)}


def make_client(config: MqttConfig, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    if config.username:
        client.username_pw_set(config.username, config.password or None)
    if config.tls_ca is not None or config.tls_cert is not None:
        ca, cert, key = (str(path) if path else None for path in (config.tls_ca, config.tls_cert, config.tls_key))
        try:
            client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
        except OSError as error:  # ssl.SSLError is an OSError
            msg = f"cannot load TLS files (mqtt.tls_ca={ca}, tls_cert={cert}, tls_key={key}): {error}"
            raise TransferError(msg) from error
    return client
