"""What operators and agents say about changing the serving model: commands, events, and bundle transfers.

A push travels as chunks of a tar archive (see agent/rollout/receiver.py for the protocol): the operator
publishes TransferMeta, the agent answers every meta and chunk with a TransferAck and ends with a verdict
("received" or "failed"), which it also publishes to everyone as a ModelEvent. Commands that change what
serves carry an operator's signature over their other fields, the agent they are for, and a fresh nonce.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from .codec import Identifier, ModelLabel, Name, Part, Record, Text, UnixTime

MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 16 * 2**20
MAX_CHUNKS = 16_384  # chunks in one transfer: 4 GiB at the default 256 KiB
_SHA256 = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, Field(pattern=_SHA256)]
ChunkIndex = Annotated[int, Field(ge=0, le=MAX_CHUNKS)]

CommandAction = Literal["push", "rollback"]
TransferState = Literal["receiving", "verifying", "received", "failed"]


class ModelCommand(Record):
    """operator -> agent: change what serves. Authenticated by `signature` (Ed25519, base64) over `signed_bytes()`.

    push: allow the transfer of bundle `model` whose archive has sha256 `sha256` (allow_downgrade: even if older
    than the newest accepted version of its model id); rollback: swap back to `model`, or to the previous
    model when empty.
    """

    MAX_BYTES: ClassVar[int] = 4096

    action: CommandAction
    agent_id: Name = Field(description="The agent this command is for; any other refuses it.")
    request_id: Identifier
    model: ModelLabel | Literal[""] = ""
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$", description="push: the archive's sha256.")
    allow_downgrade: bool = False
    issued_ts: UnixTime = Field(description="When the operator signed it; agents refuse stale commands.")
    nonce: Identifier = Field(description="Random per command; agents refuse a nonce they have seen.")
    key_id: str = Field("", pattern=r"^([0-9a-f]{16})?$", description="Which operator key signed it.")
    signature: str = Field("", max_length=200, description="base64 Ed25519 signature; empty = unsigned.")

    def signed_bytes(self) -> bytes:
        """What the signature covers: this command's JSON without key_id and signature."""
        return self.model_copy(update={"key_id": "", "signature": ""}).encode()

    @staticmethod
    def new_ids() -> tuple[str, str]:
        """A fresh (request_id, nonce)."""
        return uuid.uuid4().hex[:16], uuid.uuid4().hex


class ShadowResult(Part):
    """Live frames scored by both models before a swap: the predicted change of the reject rate."""

    frames: int = Field(ge=0)
    serving_reject_rate: float = Field(ge=0, le=1)
    candidate_reject_rate: float = Field(ge=0, le=1)


class ModelEvent(Record):
    """agent -> anyone: the outcome of a push or a command; `request_id` is the transfer or command id."""

    MAX_BYTES: ClassVar[int] = 4096

    agent_id: Name
    action: CommandAction
    request_id: Annotated[str, Field(max_length=64)]  # may echo an id the agent refused: bounded, not patterned
    outcome: Literal["accepted", "refused"]
    model: ModelLabel | Literal[""] = Field("", description="The model the push or command concerned.")
    serving: ModelLabel | Literal[""] = Field("", description="What serves after it.")
    reason: Text
    shadow: ShadowResult | None = None
    ts: UnixTime


class TransferMeta(Record):
    """`.../push/<transfer>/meta`: enough to place, check and assemble every chunk of one bundle archive."""

    MAX_BYTES: ClassVar[int] = 80 * MAX_CHUNKS

    transfer_id: Identifier = Field(description="The topic level; default: the archive's sha256[:16].")
    push_id: Identifier = Field(description="Random per push: tells a repeated question from a new push.")
    total_bytes: int = Field(gt=0, description="Archive size in bytes.")
    chunk_bytes: int = Field(ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES, description="Size of every chunk but the last.")
    chunk_count: int = Field(gt=0, le=MAX_CHUNKS)
    sha256: Sha256 = Field(description="Hex sha256 of the whole archive.")
    chunk_sha256: tuple[Sha256, ...] = Field(max_length=MAX_CHUNKS, description="Hex sha256 of each chunk.")
    model_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")
    model_version: str = Field(pattern=r"^[A-Za-z0-9._+-]{1,64}$")
    command: ModelCommand | None = Field(None, description="The operator's signed push command.")

    @model_validator(mode="after")
    def _consistent(self) -> TransferMeta:
        if self.chunk_count != math.ceil(self.total_bytes / self.chunk_bytes):
            msg = f"chunk_count {self.chunk_count} does not fit total_bytes {self.total_bytes} / chunk_bytes {self.chunk_bytes}"
            raise ValueError(msg)
        if len(self.chunk_sha256) != self.chunk_count:
            msg = f"chunk_sha256 must hold {self.chunk_count} digests, holds {len(self.chunk_sha256)}"
            raise ValueError(msg)
        return self

    @classmethod
    def for_archive(cls, archive: bytes, *, model_id: str, model_version: str, chunk_bytes: int) -> TransferMeta:
        """Meta for `archive` cut into `chunk_bytes` chunks, with a fresh push_id."""
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

    @property
    def model(self) -> str:
        return f"{self.model_id}@{self.model_version}"

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_bytes, self.total_bytes - index * self.chunk_bytes)

    def same_archive(self, other: TransferMeta) -> bool:
        ignore = {"push_id", "command"}
        return self.model_dump(exclude=ignore) == other.model_dump(exclude=ignore)


class TransferAck(Record):
    """`.../push/<transfer>/ack`: the agent's answer to every meta and chunk, then its verdict.

    receiving: an answer to meta carries `missing` ([start, stop) chunk ranges still needed); an answer to a
    chunk carries `chunk`, and `refused` when it was discarded. verifying: every chunk is in. received or
    failed (with `reason`): the verdict.
    """

    MAX_BYTES: ClassVar[int] = 256 * 1024

    transfer_id: Annotated[str, Field(max_length=64)]
    state: TransferState
    received: int = Field(0, ge=0, le=MAX_CHUNKS, description="Chunks the agent holds.")
    chunk_count: int = Field(0, ge=0, le=MAX_CHUNKS)
    missing: tuple[tuple[ChunkIndex, ChunkIndex], ...] | None = Field(None, max_length=MAX_CHUNKS)
    chunk: ChunkIndex | None = None
    refused: Text = ""
    reason: Text = ""

    @model_validator(mode="after")
    def _ranges_ordered(self) -> TransferAck:
        if self.missing is not None and any(start >= stop for start, stop in self.missing):
            msg = "missing ranges must be [start, stop) with start < stop"
            raise ValueError(msg)
        return self
