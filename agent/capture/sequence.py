"""Per-camera frame sequence numbers that never repeat: not across restarts, crashes or power cuts.

Two files per camera under state_dir/sequence/:
    <camera>.seq   the reservation: every number below it may have been used. Written (fsync'd, renamed, the
                   folder fsync'd) before a block of SEQ_BLOCK numbers is handed out, so a power cut can only
                   leave a gap, never a repeat.
    <camera>.last  the last number taken, updated in memory (a shared mapping) at every take: it survives a
                   killed process (the page cache keeps it) though not a power cut. A restart after a crash
                   continues right after it, so the only gap is the frames the dead process really had.
A clean close writes the exact next number into the reservation. An unreadable reservation is an error
that says so (SequenceError), never a silent restart at 1.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

SEQ_BLOCK = 256  # numbers reserved on disk at a time
_LAST = struct.Struct("<q")


class SequenceError(Exception):
    """A sequence file is unreadable or corrupt; the message says how to recover without repeating numbers."""


class SequenceCounter:
    """The next sequence numbers of one camera (first 1); `take` hands out one at a time."""

    def __init__(self, folder: Path, camera: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / f"{camera}.seq"
        reserved = _read_reservation(self._path)
        self._last = _open_last(folder / f"{camera}.last")
        last = _LAST.unpack_from(self._last)[0]
        # Right after the last number taken, if that is inside the reservation (a killed process); else past it.
        self.next_seq = last + 1 if 0 < last < reserved else reserved
        self._reserved_until = self.next_seq
        self._reserve()

    def peek(self) -> int:
        """The number the next take() returns."""
        return self.next_seq

    def take(self) -> int:
        """The next number. Reservations are renewed half a block ahead, so a full disk is survived until the
        current block runs out (SequenceError then: numbers past the reservation could repeat after a power cut)."""
        if self.next_seq >= self._reserved_until:
            msg = f"cannot reserve sequence numbers past {self._reserved_until} in {self._path}; free disk space"
            raise SequenceError(msg)
        seq = self.next_seq
        self.next_seq += 1
        _LAST.pack_into(self._last, 0, seq)
        if self.next_seq >= self._reserved_until - SEQ_BLOCK // 2:
            try:
                self._reserve()
            except OSError as error:
                log.error("cannot reserve sequence numbers in %s: %s; %d left", self._path, error, self.left)
        return seq

    @property
    def left(self) -> int:
        """Numbers left in the current reservation."""
        return self._reserved_until - self.next_seq

    def close(self) -> None:
        """A clean stop: the next start continues at exactly the next number."""
        if self._last.closed:
            return
        _write_durably(self._path, self.next_seq)
        self._last.close()

    def _reserve(self) -> None:
        until = self.next_seq + SEQ_BLOCK
        _write_durably(self._path, until)
        self._reserved_until = until


def _read_reservation(path: Path) -> int:
    if not path.exists():
        return 1
    text = path.read_text(errors="replace").strip()
    if not text.isdigit() or int(text) < 1:
        msg = (
            f"sequence file {path} is corrupt ({text[:40]!r}); numbering cannot continue safely. Write a number "
            "above the last seq subscribers saw for this camera into it (deleting it restarts at 1: repeats)"
        )
        raise SequenceError(msg)
    return int(text)


def _open_last(path: Path) -> mmap.mmap:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(descriptor).st_size < _LAST.size:
            os.ftruncate(descriptor, _LAST.size)
        return mmap.mmap(descriptor, _LAST.size)
    finally:
        os.close(descriptor)  # the mapping keeps the file


def _write_durably(path: Path, value: int) -> None:
    """Replace path's content with `value`: data, then rename, then the folder, each on disk before the next."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as handle:
        handle.write(str(value))
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
