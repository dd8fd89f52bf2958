"""Staged transfers on the agent's disk: staging/<transfer_id>/ with archive.tar and transfer.json (chunk map).

See agent/rollout/wire.py for the topics, acks and resume rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lineguard.agent.contract import TransferMeta, TransferState, decode
from lineguard.agent.contract.codec import ID_PATTERN
from lineguard.agent.rollout.wire import MAX_ARCHIVE_BYTES, MAX_MEMBERS, as_ranges, expand

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    """Delete a file or folder tree if present; a failure is logged, not raised (cleanup only)."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove %s (%s); remove it by hand", path, error)


@dataclass(frozen=True, slots=True)
class StagingLimits:
    """Caps on what unsigned traffic can make an agent hold; each refusal names its key (rollout.*)."""

    max_transfers: int = 2
    staging_max_bytes: int = 4 * 2**30  # archive + unpacked bundle of every transfer, allocated
    reserve_bytes: int = 512 * 2**20  # free space a push must leave on the staging file system
    max_archive_bytes: int = MAX_ARCHIVE_BYTES
    max_chunks: int = 16_384
    max_members: int = MAX_MEMBERS
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if min(self.max_transfers, self.staging_max_bytes, self.max_archive_bytes, self.max_chunks) <= 0:
            msg = f"staging limits must be > 0: {self}"
            raise ValueError(msg)
        if self.timeout_s <= 0 or self.reserve_bytes < 0 or self.max_members <= 0:
            msg = f"timeout_s and max_members must be > 0, reserve_bytes >= 0: {self}"
            raise ValueError(msg)

    def refusal(self, meta: TransferMeta, *, staged: list[_Incoming], free_bytes: int) -> str:
        """Why a new transfer of `meta` cannot be staged now ("" when it can)."""
        need = 2 * meta.total_bytes  # the archive, then the unpacked bundle beside it
        held = sum(2 * each.meta.total_bytes for each in staged)
        checks = (
            (
                meta.total_bytes > self.max_archive_bytes,
                f"archive is {meta.total_bytes} bytes; the limit is {self.max_archive_bytes} (rollout.max_archive_bytes)",
            ),
            (
                meta.chunk_count > self.max_chunks,
                f"{meta.chunk_count} chunks; the limit is {self.max_chunks} (rollout.max_chunks)",
            ),
            (
                len(staged) >= self.max_transfers,
                f"{len(staged)} transfers are staged already; the limit is {self.max_transfers} (rollout.max_transfers): wait or let them expire",
            ),
            (
                held + need > self.staging_max_bytes,
                f"staging holds {held} bytes and this push needs {need}; the budget is {self.staging_max_bytes} (rollout.staging_max_bytes)",
            ),
            (
                free_bytes - need < self.reserve_bytes,
                f"the staging file system has {free_bytes} bytes free; this push needs {need} and must leave {self.reserve_bytes} (rollout.staging_reserve_bytes)",
            ),
        )
        return next((why for refused, why in checks if refused), "")


RECORD_FILE = "transfer.json"  # chunk map and state: rewritten after every chunk, small
META_FILE = "meta.json"  # the TransferMeta: written when the transfer starts (and when a new push_id resumes it)


@dataclass
class _Incoming:
    """One staged transfer: its meta, folder and chunk map; meta.json and transfer.json mirror it on disk."""

    meta: TransferMeta
    folder: Path
    received: set[int] = field(default_factory=set)
    state: TransferState = "receiving"
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
            os.posix_fallocate(handle.fileno(), 0, meta.total_bytes)  # allocated now: no overcommitted sparse file
        incoming = cls(meta, folder)
        incoming.replace_meta(meta)
        return incoming

    @classmethod
    def load(cls, folder: Path) -> _Incoming:
        """Raises OSError, ValueError (ContractError), KeyError or TypeError for a missing or damaged transfer."""
        meta = decode(TransferMeta, (folder / META_FILE).read_bytes())
        raw = json.loads((folder / RECORD_FILE).read_bytes())
        if meta.transfer_id != folder.name or raw["state"] not in ("receiving", "received", "failed"):
            msg = f"{folder / RECORD_FILE} does not describe transfer {folder.name}"
            raise ValueError(msg)
        received = expand(tuple(map(tuple, raw["received"])), meta.chunk_count)
        return cls(meta, folder, received, raw["state"], str(raw["reason"]), float(raw["updated_unix_s"]))

    def replace_meta(self, meta: TransferMeta) -> None:
        """Take a (re-sent) meta of the same archive, on disk too."""
        self.meta, self.updated_unix_s = meta, time.time()
        _write_atomically(self.folder / META_FILE, meta.encode())
        self.save()

    def save(self) -> None:
        record = {
            "received": as_ranges(self.received),
            "state": self.state,
            "reason": self.reason,
            "updated_unix_s": self.updated_unix_s,
        }
        _write_atomically(self.folder / RECORD_FILE, json.dumps(record).encode())

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


def _write_atomically(path: Path, data: bytes) -> None:
    """A crash leaves the old file or the new one, never a torn one."""
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _load_staged(staging_dir: Path, limits: StagingLimits) -> dict[str, _Incoming]:
    """Transfers staged by an earlier receiver, newest first and at most limits.max_transfers of them;
    unreadable, surplus or oversized transfer folders are removed (a backlog never stops a start)."""
    transfers: dict[str, _Incoming] = {}
    folders = [p for p in staging_dir.iterdir() if p.is_dir() and re.fullmatch(ID_PATTERN, p.name)]
    for folder in sorted(folders, key=_mtime, reverse=True):
        try:
            if len(transfers) >= limits.max_transfers:
                msg = f"more than {limits.max_transfers} transfers staged (rollout.max_transfers)"
                raise ValueError(msg)
            incoming = _Incoming.load(folder)
            if incoming.meta.total_bytes > limits.max_archive_bytes or incoming.meta.chunk_count > limits.max_chunks:
                msg = "larger than rollout.max_archive_bytes or rollout.max_chunks allow"
                raise ValueError(msg)
            transfers[folder.name] = incoming
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("staging folder %s cannot resume (%s); removing it", folder, error)
            _remove(folder)
    for stray in staging_dir.iterdir():
        if stray.name not in transfers:
            _remove(stray)
    return transfers


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
