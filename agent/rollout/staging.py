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
from lineguard.agent.rollout.wire import as_ranges, expand

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
            handle.truncate(meta.total_bytes)  # sparse until the chunks land
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
        received = expand(tuple(map(tuple, raw["received"]))) & set(range(meta.chunk_count))
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


def _load_staged(staging_dir: Path) -> dict[str, _Incoming]:
    """Transfers staged by an earlier receiver; unreadable transfer folders are removed."""
    transfers: dict[str, _Incoming] = {}
    for folder in sorted(staging_dir.iterdir()):
        if not folder.is_dir() or not re.fullmatch(ID_PATTERN, folder.name):
            continue
        try:
            transfers[folder.name] = _Incoming.load(folder)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("staging folder %s is unreadable (%s); removing it", folder, error)
            _remove(folder)
    return transfers
