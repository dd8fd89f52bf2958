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
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import tarfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lineguard.agent.bundle import MANIFEST_FILE, BundleError, file_sha256
from lineguard.agent.config import MqttConfig

log = logging.getLogger(__name__)

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


# -- the archive ----------------------------------------------------------------------------------------------

_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


def pack_bundle(bundle_dir: Path) -> bytes:
    """The bundle's files as an uncompressed tar, byte-identical for identical files (sorted, mtime 0, mode 644)."""
    if not bundle_dir.is_dir():
        msg = f"bundle folder {bundle_dir} does not exist"
        raise ArchiveError(msg)
    files: list[Path] = []
    for folder, subfolders, names in os.walk(bundle_dir):
        for name in (*subfolders, *names):
            path = Path(folder) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                msg = f"{path} is a link or special file; a bundle holds plain files only: copy the real file in"
                raise ArchiveError(msg)
            if path.is_file():
                files.append(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(files, key=lambda each: each.relative_to(bundle_dir).as_posix()):
            info = tarfile.TarInfo(path.relative_to(bundle_dir).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as handle:
                archive.addfile(info, handle)
    return buffer.getvalue()


def unpack_bundle(archive: bytes | Path, dest_dir: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES) -> None:
    """Unpack a tar (bytes or a file) into the new or empty `dest_dir`; regular files and folders only.

    Raises ArchiveError, before writing anything, for absolute paths, `..`, links, devices, fifos, sparse files
    or more than `max_bytes` of content; then extracts with tarfile's "data" filter where Python has it.
    """
    if dest_dir.exists() and any(dest_dir.iterdir()):
        msg = f"cannot unpack into {dest_dir}: it is not empty"
        raise ArchiveError(msg)
    try:
        with (
            tarfile.open(fileobj=io.BytesIO(archive), mode="r:")
            if isinstance(archive, bytes)
            else tarfile.open(archive, mode="r:")
        ) as tar:
            _check_members(tar.getmembers(), max_bytes)
            dest_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # 3.12, 3.11.4+, 3.10.12+
                tar.extractall(dest_dir, filter="data")
            else:  # every member was checked above: plain files and folders inside dest_dir
                tar.extractall(dest_dir)
    except tarfile.TarError as error:
        msg = f"bundle archive is not a valid tar: {error}"
        raise ArchiveError(msg) from error


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> None:
    total = 0
    for member in members:
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or PurePosixPath(member.name).is_absolute():
            msg = f"archive member {member.name!r} has an absolute path; refused"
            raise ArchiveError(msg)
        if ".." in parts:
            msg = f"archive member {member.name!r} points outside the bundle folder (..); refused"
            raise ArchiveError(msg)
        if not (member.isfile() or member.isdir()) or member.issparse():
            kind = "sparse file" if member.issparse() else _KINDS.get(member.type, f"type {member.type!r} entry")
            msg = f"archive member {member.name!r} is a {kind}; a bundle holds plain files and folders only"
            raise ArchiveError(msg)
        total += member.size
        if total > max_bytes:
            msg = f"archive unpacks to more than {max_bytes} bytes; refused"
            raise ArchiveError(msg)


def read_model_id(bundle_dir: Path) -> tuple[str, str]:
    """(model_id, model_version) from the bundle's manifest; the agent verifies signature and digests."""
    try:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_bytes())
        model_id, model_version = manifest["model_id"], manifest["model_version"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        msg = f"{bundle_dir} is not a model bundle: cannot read model_id and model_version from {MANIFEST_FILE} ({error!r})"
        raise BundleError(msg) from error
    return str(model_id), str(model_version)


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


def _remove(path: Path) -> None:
    """Delete a file or folder tree if present; a failure is logged, not raised (cleanup only)."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s (%s); remove it by hand", path, error)


# -- operator side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """Where a push stands; given to the progress callback after each chunk the agent confirms."""

    transfer_id: str
    chunks_received: int  # chunks the agent holds
    chunk_count: int
    bytes_received: int
    total_bytes: int
    chunks_sent: int  # by this send()


ProgressCallback = Callable[[TransferProgress], None]


@dataclass(frozen=True, slots=True)
class TransferResult:
    """A push the agent accepted."""

    transfer_id: str
    agent_id: str
    model: str  # id@version
    total_bytes: int
    chunk_count: int
    chunks_sent: int  # by this send(): fewer than chunk_count when the agent already held some (resume)
    elapsed_s: float
    reason: str  # the agent's words


@dataclass
class _Push:
    """The sender's view of one transfer: what the agent holds, what is in flight, what to send next."""

    client: mqtt.Client
    archive: bytes
    meta: TransferMeta
    topics: PushTopics
    window: int
    received: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # sent, not yet confirmed by the agent
    to_send: deque[int] = field(default_factory=deque)
    refusals: Counter[int] = field(default_factory=Counter)
    waiting_for_list: bool = True  # asked (meta) and not yet told what is missing: send nothing
    chunks_sent: int = 0

    def ask(self) -> None:
        """Publish meta: the agent answers with the chunks it still needs."""
        self.client.publish(self.topics.meta, self.meta.model_dump_json().encode(), qos=1)
        self.waiting_for_list = True
        self.in_flight.clear()
        self.to_send.clear()

    def send_window(self) -> None:
        while not self.waiting_for_list and self.to_send and len(self.in_flight) < self.window:
            index = self.to_send.popleft()
            if index in self.received or index in self.in_flight:
                continue
            start = index * self.meta.chunk_bytes
            self.client.publish(self.topics.chunk(index), self.archive[start : start + self.meta.chunk_bytes], qos=1)
            self.in_flight.add(index)
            self.chunks_sent += 1

    def handle(self, ack: Ack) -> bool:
        """Apply one ack; True when it confirmed a new chunk. TransferError when the agent refuses the push."""
        if ack.state == "failed":
            msg = f"agent {self.topics.agent_id} refused transfer {self.meta.transfer_id} of {self.meta.model}: {ack.reason}"
            raise TransferError(msg, reason=ack.reason)
        if ack.missing is not None and self.waiting_for_list:
            missing = _expand(ack.missing)
            self.received = set(range(self.meta.chunk_count)) - missing
            self.to_send = deque(sorted(missing))
            self.waiting_for_list = False
        if ack.chunk is None:
            return False
        self.in_flight.discard(ack.chunk)
        if ack.refused:
            self.refusals[ack.chunk] += 1
            log.warning("agent %s refused chunk %d: %s", self.topics.agent_id, ack.chunk, ack.refused)
            if self.refusals[ack.chunk] >= MAX_REFUSALS:
                msg = f"agent {self.topics.agent_id} refused chunk {ack.chunk} {MAX_REFUSALS} times: {ack.refused}"
                raise TransferError(msg, reason=ack.refused)
            self.to_send.appendleft(ack.chunk)
            return False
        new = ack.chunk not in self.received
        self.received.add(ack.chunk)
        return new

    def progress(self) -> TransferProgress:
        meta, count = self.meta, len(self.received)
        short_last = meta.chunk_bytes - meta.chunk_length(meta.chunk_count - 1)
        received_bytes = count * meta.chunk_bytes - (short_last if meta.chunk_count - 1 in self.received else 0)
        return TransferProgress(
            meta.transfer_id, count, meta.chunk_count, received_bytes, meta.total_bytes, self.chunks_sent
        )


_RECONNECTED = object()  # queued by on_connect after a reconnect: ask the agent again


@dataclass(frozen=True, slots=True)
class _BrokerRefusal:
    """A PUBACK with a failure code: Mosquitto 2.0 answers a publish its ACL denies with 0x87 (MQTT 5)."""

    reason: str


class BundleSender:
    """Operator side: one paho client (MQTT 5, clean session) that pushes bundles to agents, one at a time."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        window_chunks: int = WINDOW_CHUNKS,
        ask_interval_s: float = 5.0,
    ) -> None:
        """Connect (waits up to CONNECT_TIMEOUT_S); TransferError if the broker is unreachable or refuses us.

        window_chunks: chunks sent and not yet confirmed by the agent; ask_interval_s: silence after which the
        sender publishes meta again to learn what is missing."""
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            msg = f"chunk_bytes must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {chunk_bytes}"
            raise ValueError(msg)
        if not 1 <= window_chunks <= 64 or ask_interval_s <= 0:
            msg = f"window_chunks must be in 1..64 and ask_interval_s > 0, got {window_chunks}, {ask_interval_s}"
            raise ValueError(msg)
        self._prefix = config.topic_prefix
        self._chunk_bytes, self._window, self._ask_interval_s = chunk_bytes, window_chunks, ask_interval_s
        self._where = f"{config.host}:{config.port}"
        self._inbox: queue.Queue[object] = queue.Queue()
        self._ack_topic: str | None = None
        self._connected, self._subscribed = threading.Event(), threading.Event()
        self._problem = ""
        self._client = make_client(config, client_id or f"lineguard-push-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._closing = False
        self._user = config.username
        try:
            self._client.connect(config.host, config.port, config.keepalive_s)
        except OSError as error:
            msg = f"cannot connect to broker {self._where}: {error}"
            raise TransferError(msg) from error
        self._client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S) or self._problem:
            self.close()
            msg = f"broker {self._where}: {self._problem or 'no CONNACK; a TLS port and mqtt.tls_ca unset?'}"
            raise TransferError(msg)

    def send(
        self, bundle_dir: Path, *, agent_id: str, timeout_s: float = 600.0, progress: ProgressCallback | None = None
    ) -> TransferResult:
        """Push the bundle to `agent_id`; return once the agent has verified and accepted it.

        Raises TransferError (the agent refused it: `.reason` holds why; or no verdict within timeout_s),
        BundleError (no readable manifest), ArchiveError (links or special files in the bundle). An exception
        raised by `progress` stops the push; a later send() of the same bundle resumes it."""
        if timeout_s <= 0:
            msg = f"timeout_s must be > 0, got {timeout_s}"
            raise ValueError(msg)
        model_id, model_version = read_model_id(bundle_dir)
        archive = pack_bundle(bundle_dir)
        meta = TransferMeta.for_archive(
            archive, model_id=model_id, model_version=model_version, chunk_bytes=self._chunk_bytes
        )
        topics = push_topics(self._prefix, agent_id, meta.transfer_id)
        log.info(
            "pushing %s to %s as transfer %s: %d bytes in %d chunks",
            meta.model,
            agent_id,
            meta.transfer_id,
            meta.total_bytes,
            meta.chunk_count,
        )
        try:
            self._subscribe(topics.ack)
            return self._run(_Push(self._client, archive, meta, topics, self._window), timeout_s, progress)
        finally:
            self._ack_topic = None
            self._client.unsubscribe(topics.ack)

    def _run(self, push: _Push, timeout_s: float, progress: ProgressCallback | None) -> TransferResult:
        started = heard = time.monotonic()
        deadline = started + timeout_s
        push.ask()
        while True:
            push.send_window()
            now = time.monotonic()
            if now >= deadline:
                msg = (
                    f"agent {push.topics.agent_id} gave no verdict on transfer {push.meta.transfer_id} within "
                    f"{timeout_s:g} s ({len(push.received)}/{push.meta.chunk_count} chunks confirmed); is it online "
                    f"and may this user publish to {push.topics.meta}?"
                )
                raise TransferError(msg)
            try:
                item = self._inbox.get(timeout=min(deadline, heard + self._ask_interval_s) - now)
            except queue.Empty:
                item = None
            if isinstance(item, _BrokerRefusal):
                msg = (
                    f"broker {self._where} refused our publish to {push.topics.base}/...: {item.reason}; "
                    f"is user {self._user or '(anonymous)'} an operator in the broker's ACL (deploy/mosquitto/README.md)?"
                )
                raise TransferError(msg, reason=item.reason)
            if not isinstance(item, Ack):
                why = "reconnected" if item is _RECONNECTED else f"no answer for {self._ask_interval_s:g} s"
                log.info(
                    "transfer %s: %s; asking %s which chunks it lacks", push.meta.transfer_id, why, push.topics.agent_id
                )
                push.ask()
                heard = time.monotonic()
                continue
            if item.transfer_id != push.meta.transfer_id:
                continue
            heard = time.monotonic()
            if push.handle(item) and progress is not None:
                progress(push.progress())
            if item.state == "received":
                elapsed_s = time.monotonic() - started
                log.info(
                    "agent %s accepted %s in %.1f s: %s", push.topics.agent_id, push.meta.model, elapsed_s, item.reason
                )
                meta = push.meta
                return TransferResult(
                    meta.transfer_id,
                    push.topics.agent_id,
                    meta.model,
                    meta.total_bytes,
                    meta.chunk_count,
                    push.chunks_sent,
                    elapsed_s,
                    item.reason,
                )

    def _subscribe(self, topic: str) -> None:
        while not self._inbox.empty():  # answers left over from an earlier push
            self._inbox.get_nowait()
        self._subscribed.clear()
        self._problem = ""
        self._ack_topic = topic
        self._client.subscribe(topic, qos=1)
        if not self._subscribed.wait(CONNECT_TIMEOUT_S) or self._problem:
            msg = f"broker {self._where} did not grant a subscription to {topic}: {self._problem or 'no SUBACK'}"
            raise TransferError(msg)

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> BundleSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- paho's network thread ------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            hint = "; check mqtt.username and mqtt.password" if reason.value in (0x86, 0x87) else ""
            self._problem = f"refused the connection: {reason}{hint}"
            self._connected.set()
            return
        reconnect = self._connected.is_set()
        self._connected.set()
        if self._ack_topic is not None:
            client.subscribe(self._ack_topic, qos=1)
            if reconnect:
                self._inbox.put(_RECONNECTED)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        if any(code.is_failure for code in codes):
            self._problem = ", ".join(str(code) for code in codes)
        self._subscribed.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if reason.is_failure and self._ack_topic is not None:
            self._inbox.put(_BrokerRefusal(str(reason)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._closing:
            log.warning("connection to broker %s lost (%s); reconnecting", self._where, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self._ack_topic:
            return
        try:
            self._inbox.put(Ack.decode(bytes(message.payload)))
        except (ValueError, TypeError) as error:
            log.warning("ignoring a malformed ack on %s: %s", message.topic, error)


# -- agent side -------------------------------------------------------------------------------------------------

OnBundle = Callable[[Path, str], tuple[bool, str]]
RECORD_FILE = "transfer.json"


@dataclass
class _Incoming:
    """One staged transfer: its meta, folder and chunk map; transfer.json mirrors it after every change."""

    meta: TransferMeta
    folder: Path
    received: set[int] = field(default_factory=set)
    state: State = "receiving"
    reason: str = ""
    updated_unix_s: float = field(default_factory=time.time)

    @property
    def archive(self) -> Path:
        return self.folder / "archive.tar"

    @property
    def bundle(self) -> Path:
        return self.folder / "bundle"

    @property
    def complete(self) -> bool:
        return len(self.received) == self.meta.chunk_count

    def missing(self) -> set[int]:
        return set(range(self.meta.chunk_count)) - self.received

    @classmethod
    def create(cls, folder: Path, meta: TransferMeta) -> _Incoming:
        _remove(folder)
        folder.mkdir(parents=True)
        with (folder / "archive.tar").open("wb") as handle:
            handle.truncate(meta.total_bytes)  # sparse until the chunks land
        incoming = cls(meta, folder)
        incoming.save()
        return incoming

    @classmethod
    def load(cls, folder: Path) -> _Incoming:
        """Raises OSError, ValueError, KeyError or TypeError for a missing or damaged transfer.json."""
        raw = json.loads((folder / RECORD_FILE).read_bytes())
        meta = TransferMeta.model_validate(raw["meta"])
        if meta.transfer_id != folder.name or raw["state"] not in ("receiving", "received", "failed"):
            msg = f"{folder / RECORD_FILE} does not describe transfer {folder.name}"
            raise ValueError(msg)
        received = _expand(raw["received"]) & set(range(meta.chunk_count))
        return cls(meta, folder, received, raw["state"], str(raw["reason"]), float(raw["updated_unix_s"]))

    def save(self) -> None:
        record = {
            "meta": self.meta.model_dump(mode="json"),
            "received": _ranges(self.received),
            "state": self.state,
            "reason": self.reason,
            "updated_unix_s": self.updated_unix_s,
        }
        temporary = self.folder / f"{RECORD_FILE}.tmp"
        temporary.write_text(json.dumps(record))
        temporary.replace(self.folder / RECORD_FILE)  # atomic: a crash leaves the old map or the new one

    def check(self, index_text: str, data: bytes) -> tuple[int | None, str]:
        """(index, "") for a chunk that belongs at `index`, else (index or None, why not)."""
        if not re.fullmatch(r"[0-9]{1,9}", index_text) or int(index_text) >= self.meta.chunk_count:
            return None, f"chunk index {index_text!r} is not in 0..{self.meta.chunk_count - 1}"
        index = int(index_text)
        if len(data) != self.meta.chunk_length(index):
            return index, f"chunk {index} has {len(data)} bytes, expected {self.meta.chunk_length(index)}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.meta.chunk_sha256[index]:
            expected = self.meta.chunk_sha256[index]
            return index, f"chunk {index} has sha256 {digest[:12]}…, meta says {expected[:12]}…: corrupted on the way"
        return index, ""

    def store(self, index: int, data: bytes) -> None:
        """Write a checked chunk at its offset, on disk (fsync) before the chunk map says so."""
        with self.archive.open("r+b") as handle:
            handle.seek(index * self.meta.chunk_bytes)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.received.add(index)
        self.updated_unix_s = time.time()
        self.save()


class BundleReceiver:
    """Agent side: its own paho client (MQTT 5, persistent session) and one worker thread that stages pushes.

    Connects with the agent's MqttConfig (host, credentials, TLS, topic_prefix) as client id
    `<mqtt.client_id or lineguard-<agent_id>>-deploy`, in the background, reconnecting on its own; subscribes to
    `<prefix>/<agent_id>/model/push/+/meta` and `.../+/chunk/+`. It owns `staging_dir`: one folder per transfer
    (archive.tar, transfer.json), resumed from disk when a receiver starts. When an archive is complete, its
    sha256 checked and unpacked at staging_dir/<transfer_id>/bundle, `on_bundle(path, transfer_id) -> (ok,
    reason)` runs on the worker thread (it may take its time; move or copy what it keeps: the folder is deleted
    when it returns) and its answer is the verdict published on the ack and events topics.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        agent_id: str,
        staging_dir: Path,
        on_bundle: OnBundle,
        abandon_after_s: float = 600.0,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> None:
        push_topics(config.topic_prefix, agent_id, "check")  # ValueError for an agent id that is no topic level
        if abandon_after_s <= 0 or max_archive_bytes <= 0:
            msg = f"abandon_after_s and max_archive_bytes must be > 0, got {abandon_after_s}, {max_archive_bytes}"
            raise ValueError(msg)
        self._prefix, self._agent_id = config.topic_prefix, agent_id
        self._subscription = f"{config.topic_prefix}/{agent_id}/model/push/"
        self._staging_dir = staging_dir
        self._on_bundle = on_bundle
        self._abandon_after_s, self._max_archive_bytes = abandon_after_s, max_archive_bytes
        self._sweep_interval_s = min(abandon_after_s / 4, 5.0)
        staging_dir.mkdir(parents=True, exist_ok=True)
        self._transfers = _load_staged(staging_dir)  # only the worker thread touches it after this
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._inbox_bytes = 0
        self._lock = threading.Lock()  # guards _inbox_bytes
        self._subscribed = threading.Event()
        self._client = make_client(config, f"{config.client_id or 'lineguard-' + agent_id}-deploy")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._closing = False
        self._client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="bundle-receiver", daemon=True)
        self._worker.start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            config.host, config.port, config.keepalive_s, clean_start=False, properties=properties
        )
        self._client.loop_start()
        log.info("bundle receiver %s: staging in %s, %d transfers on disk", agent_id, staging_dir, len(self._transfers))

    def wait_subscribed(self, timeout_s: float) -> bool:
        """True once the broker granted the push subscriptions (pushes before that wait in the broker's session)."""
        return self._subscribed.wait(timeout_s)

    def missing_chunks(self, transfer_id: str) -> list[int] | None:
        """Chunk indices the staged transfer still needs, from its chunk map on disk; None if none is staged."""
        push_topics(self._prefix, self._agent_id, transfer_id)  # ValueError for a name that is no folder of ours
        try:
            return sorted(_Incoming.load(self._staging_dir / transfer_id).missing())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def close(self, *, timeout_s: float = 30.0) -> None:
        """Finish the messages already received, then disconnect (the broker keeps the session for later ones)."""
        self._closing = True
        self._inbox.put(None)
        self._worker.join(timeout_s)
        if self._worker.is_alive():
            log.warning("bundle receiver still busy after %g s (in on_bundle?); disconnecting anyway", timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> BundleReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- paho's network thread: only hand messages to the worker -----------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("bundle receiver: broker refused the connection: %s; check mqtt.username/password", reason)
            return
        log.info("bundle receiver connected (session present: %s)", flags.session_present)
        client.subscribe([(f"{self._subscription}+/meta", 1), (f"{self._subscription}+/chunk/+", 1)])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._subscribed.clear()
        if not self._closing:
            log.warning("bundle receiver lost its broker connection (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("bundle receiver: broker refused the subscriptions to %s: %s", self._subscription, codes)
        else:
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        size = len(message.payload)
        with self._lock:
            if "/chunk/" in message.topic and self._inbox_bytes + size > INBOX_MAX_BYTES:
                log.warning(
                    "bundle receiver backlog over %d bytes: dropped %s (asked for again)",
                    INBOX_MAX_BYTES,
                    message.topic,
                )
                return
            self._inbox_bytes += size
        self._inbox.put((message.topic, bytes(message.payload)))

    # -- the worker thread ---------------------------------------------------------------------------------------

    def _work(self) -> None:
        next_sweep_s = time.monotonic()
        while True:
            try:
                item = self._inbox.get(timeout=self._sweep_interval_s)
            except queue.Empty:
                item = ("", b"")
            if item is None:
                return
            try:
                if item[0]:
                    self._dispatch(*item)
                if time.monotonic() >= next_sweep_s:
                    next_sweep_s = time.monotonic() + self._sweep_interval_s
                    self._sweep()
            except Exception:  # top of the receiver's thread: one bad push must not stop the later ones
                log.exception("bundle receiver failed on %s; carrying on", item[0] or "its sweep")

    def _dispatch(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self._inbox_bytes -= len(payload)
        levels = topic[len(self._subscription) :].split("/")
        try:
            topics = push_topics(self._prefix, self._agent_id, levels[0])
        except ValueError as error:
            log.warning("ignoring a push on %s: %s", topic, error)
            return
        if levels[1:] == ["meta"]:
            self._on_meta(topics, payload)
        elif len(levels) == 3 and levels[1] == "chunk":
            self._on_chunk(topics, levels[2], payload)

    def _on_meta(self, topics: PushTopics, payload: bytes) -> None:
        try:
            meta = TransferMeta.decode(payload)
            if meta.transfer_id != topics.transfer_id:
                msg = f"transfer_id {meta.transfer_id!r} differs from the topic's {topics.transfer_id!r}"
                raise ValueError(msg)
        except ValueError as error:
            self._publish_verdict(topics, None, "failed", f"meta is not valid: {error}")
            return
        current = self._transfers.get(meta.transfer_id)
        if current is not None and current.meta.same_archive(meta):
            if current.state == "receiving":  # a sender asking what is missing, maybe a new one: resume
                log.info(
                    "transfer %s: asked again; holding %d of %d chunks",
                    meta.transfer_id,
                    len(current.received),
                    meta.chunk_count,
                )
                current.meta, current.updated_unix_s = meta, time.time()
                current.save()
                self._answer_meta(current)
                return
            if current.meta.push_id == meta.push_id:  # the same push asking again: repeat the verdict
                self._publish_verdict(topics, current, current.state, current.reason)
                return
        if current is not None:
            log.info("transfer %s: a new push replaces the staged one (%s)", meta.transfer_id, current.state)
            self._discard(current)
        if problem := self._refusal(meta):
            self._publish_verdict(topics, None, "failed", problem, model=meta.model)
            return
        incoming = _Incoming.create(self._staging_dir / meta.transfer_id, meta)
        self._transfers[meta.transfer_id] = incoming
        log.info(
            "transfer %s of %s started: %d bytes in %d chunks",
            meta.transfer_id,
            meta.model,
            meta.total_bytes,
            meta.chunk_count,
        )
        self._answer_meta(incoming)

    def _answer_meta(self, incoming: _Incoming) -> None:
        if incoming.complete:  # staged before a restart: install it now
            self._finish(incoming)
        else:
            self._ack(incoming, "receiving", missing=_ranges(incoming.missing()))

    def _on_chunk(self, topics: PushTopics, index_text: str, payload: bytes) -> None:
        incoming = self._transfers.get(topics.transfer_id)
        if incoming is None or incoming.state != "receiving":  # late duplicates, or meta not seen yet
            log.debug(
                "ignoring chunk %s of transfer %s (%s)", index_text, topics.transfer_id, incoming and incoming.state
            )
            return
        index, problem = incoming.check(index_text, payload)
        if index is None or problem:
            log.warning("transfer %s: refused %s", topics.transfer_id, problem)
            self._ack(incoming, "receiving", chunk=index, refused=problem)
            return
        if index not in incoming.received:
            try:
                incoming.store(index, payload)
            except OSError as error:
                self._conclude(incoming, "failed", f"cannot write chunk {index} to {incoming.archive}: {error}")
                return
        self._ack(incoming, "receiving", chunk=index)
        if incoming.complete:
            self._finish(incoming)

    def _finish(self, incoming: _Incoming) -> None:
        """Verify the whole archive, unpack it, let on_bundle judge it, publish the verdict."""
        self._ack(incoming, "verifying")
        try:
            actual = file_sha256(incoming.archive)
            if actual != incoming.meta.sha256:
                msg = f"archive sha256 {actual[:12]}… differs from the meta's {incoming.meta.sha256[:12]}…: push again"
                raise ArchiveError(msg)
            _remove(incoming.bundle)
            unpack_bundle(incoming.archive, incoming.bundle, max_bytes=incoming.meta.total_bytes)
        except (ArchiveError, OSError) as error:
            self._conclude(incoming, "failed", f"bundle archive refused: {error}")
            return
        try:
            ok, reason = self._on_bundle(incoming.bundle, incoming.meta.transfer_id)
        except Exception as error:  # the agent's code: its failure is this push's verdict, not the receiver's end
            log.exception("on_bundle failed on transfer %s", incoming.meta.transfer_id)
            ok, reason = False, f"on_bundle failed: {type(error).__name__}: {error}"
        self._conclude(incoming, "received" if ok else "failed", str(reason))

    def _conclude(self, incoming: _Incoming, state: State, reason: str) -> None:
        incoming.state, incoming.reason, incoming.updated_unix_s = state, reason, time.time()
        _remove(incoming.archive)
        _remove(incoming.bundle)
        incoming.save()  # only transfer.json stays, until the sweep: a sender asking again gets the verdict
        self._publish_verdict(
            push_topics(self._prefix, self._agent_id, incoming.meta.transfer_id), incoming, state, reason
        )

    def _sweep(self) -> None:
        """Install transfers staged whole before a restart; fail and remove those idle for abandon_after_s."""
        now = time.time()
        for incoming in list(self._transfers.values()):
            if incoming.state == "receiving" and incoming.complete and self._subscribed.is_set():
                self._finish(incoming)
                continue
            idle_s = now - incoming.updated_unix_s
            if idle_s < self._abandon_after_s:
                continue
            if incoming.state == "receiving":
                reason = f"abandoned: nothing arrived for {idle_s:.0f} s (abandon_after_s={self._abandon_after_s:g}); push again"
                self._conclude(incoming, "failed", reason)
            self._discard(incoming)

    def _discard(self, incoming: _Incoming) -> None:
        _remove(incoming.folder)
        self._transfers.pop(incoming.meta.transfer_id, None)

    def _refusal(self, meta: TransferMeta) -> str:
        if meta.total_bytes > self._max_archive_bytes:
            return f"archive is {meta.total_bytes} bytes; this agent takes at most {self._max_archive_bytes} (max_archive_bytes)"
        free = shutil.disk_usage(self._staging_dir).free
        if free < 2 * meta.total_bytes:  # the archive, then the unpacked bundle beside it
            return f"staging folder {self._staging_dir} has {free} bytes free; this push needs {2 * meta.total_bytes}"
        return ""

    def _ack(
        self,
        incoming: _Incoming,
        state: State,
        *,
        missing: tuple[tuple[int, int], ...] | None = None,
        chunk: int | None = None,
        refused: str = "",
    ) -> None:
        ack = Ack(
            incoming.meta.transfer_id, state, len(incoming.received), incoming.meta.chunk_count, missing, chunk, refused
        )
        topics = push_topics(self._prefix, self._agent_id, incoming.meta.transfer_id)
        self._client.publish(topics.ack, ack.encode(), qos=1)

    def _publish_verdict(
        self, topics: PushTopics, incoming: _Incoming | None, state: State, reason: str, *, model: str = ""
    ) -> None:
        """The final answer on the ack topic and, as an event, on `<prefix>/<agent_id>/model/events`."""
        received, count = (len(incoming.received), incoming.meta.chunk_count) if incoming else (0, 0)
        model = incoming.meta.model if incoming else model
        ack = Ack(topics.transfer_id, state, received, count, reason=reason)
        self._client.publish(topics.ack, ack.encode(), qos=1)
        event = {"transfer_id": topics.transfer_id, "model": model, "state": state, "reason": reason}
        self._client.publish(topics.events, json.dumps(event, separators=(",", ":")).encode(), qos=1)
        level = logging.INFO if state == "received" else logging.ERROR
        log.log(level, "transfer %s of %s %s: %s", topics.transfer_id, model or "?", state, reason)


def _load_staged(staging_dir: Path) -> dict[str, _Incoming]:
    """Transfers staged by an earlier receiver; unreadable transfer folders are removed."""
    transfers: dict[str, _Incoming] = {}
    for folder in sorted(staging_dir.iterdir()):
        if not folder.is_dir() or not re.fullmatch(TRANSFER_ID_PATTERN, folder.name):
            continue
        try:
            transfers[folder.name] = _Incoming.load(folder)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("staging folder %s is unreadable (%s); removing it", folder, error)
            _remove(folder)
    return transfers


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
    "pack_bundle",
    "push_topics",
    "read_model_id",
    "unpack_bundle",
]
