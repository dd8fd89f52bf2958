"""Shared-memory ring of fixed-size slots for frames (uint8, (H, W, C)) and anomaly maps (float32, (H, W)).

One writer process per ring claims a slot (`acquire`), fills it (`array`/`address`), marks it READY (`publish`)
and only then sends a small ZeroMQ message naming the slot and its sequence number. Readers check that sequence
number against the slot header before trusting the pixels (`read`), and one process frees the slot (`release`).
Nothing is allocated per frame: every view is built once, when the ring is created or attached.

Segment layout (native byte order; all offsets in bytes, every region 64-byte aligned):

    [0, 256)           ring header, int64 words:
                       0 magic "LGRING01", 1 layout version, 2 slot_count, 3 ndim, 4..11 slot_shape (0-padded),
                       12 payload bytes per slot, 13 slot stride, 14 slot-header offset, 15 payload offset;
                       bytes 128..159: dtype.str in ASCII, NUL-padded (e.g. "|u1", "<f4")
    [256, P)           slot headers, 64 bytes per slot, int64 words:
                       0 seq (-1 before first use), 1 state (0 FREE, 1 WRITING, 2 READY),
                       2 t_state_ns (monotonic clock, when the slot was acquired or published), 3 t_capture_ns
    [P + i * stride)   payload of slot i: prod(slot_shape) * itemsize bytes, stride rounded up to 64

The magic word is written last on create(), so an attach() racing a create() fails cleanly instead of reading
a half-written header. No process's resource tracker owns a ring segment (see `_open_segment`): the creator
unlinks on close(), and create() replaces a segment left behind by a crashed run; a reader still attached to
the old one sees StaleSlotError for every frame and replaced() == True, and attaches again. Linux only.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import shutil
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"LGRING01", "little")
LAYOUT_VERSION = 1
FREE, WRITING, READY = 0, 1, 2
_STATE_NAMES = {FREE: "FREE", WRITING: "WRITING", READY: "READY"}
_SEQ, _STATE, _T_STATE, _T_CAPTURE = 0, 1, 2, 3
_RING_HEADER_BYTES = 256
_SLOT_HEADER_WORDS = 8  # 64 bytes: one cache line per slot
_ALIGN = 64
_MAX_NDIM = 8
_DTYPE_AT, _DTYPE_BYTES = 128, 32
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory


class RingError(Exception):
    """Layout mismatch, bad slot index, missing or foreign segment, bad arguments."""


class RingRefused(RingError):
    """A ring cannot be created because its name in /dev/shm belongs to someone else: not worth a restart."""


class RingMissing(RingError):
    """The ring's shared-memory segment does not exist (not created yet, or deleted from /dev/shm)."""


class StaleSlotError(RingError):
    """The slot no longer holds the expected sequence number (or is not in the expected state)."""


def _align(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


class _Segment(NamedTuple):
    shm: SharedMemory  # closed at once; kept to unlink by name
    mapping: mmap.mmap
    inode: int  # tells a replaced segment of the same name apart


def _open_segment(name: str, *, create: bool, size: int = 0) -> _Segment:
    """Open or create a POSIX segment that no resource tracker will unlink behind our back, and map it.

    Python <= 3.12 registers every SharedMemory, attached or created, with the process's resource tracker, which
    unlinks it when that process exits: an engine that attaches and exits would delete capture's ring. Spawned
    children share their parent's tracker, so an attacher's unregister could also erase the creator's entry.
    Keeping every ring untracked (the creator unlinks explicitly) is the one rule that works in both cases.

    The views use a mapping of our own, and the SharedMemory is closed at once (it is kept only to unlink):
    the mapping then lives exactly as long as the last view into it, so close() never unmaps memory that a
    caller still reads, and no SharedMemory.__del__ fails at exit with "cannot close exported pointers exist".
    """
    if sys.version_info >= (3, 13):
        shm = SharedMemory(name, create=create, size=size, track=False)
    else:
        shm = SharedMemory(name, create=create, size=size)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        mapping = mmap.mmap(shm._fd, shm.size)  # type: ignore[attr-defined]
        inode = os.fstat(shm._fd).st_ino  # type: ignore[attr-defined]
    finally:
        shm.close()
    return _Segment(shm, mapping, inode)


def _unlink_segment(shm: SharedMemory) -> bool:
    """Unlink the segment; False if someone already did."""
    if sys.version_info < (3, 13):
        # unlink() also unregisters: balance it, since _open_segment already unregistered.
        resource_tracker.register(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        shm.unlink()
    except FileNotFoundError:
        if sys.version_info < (3, 13):
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return False
    return True


def _words(mapping: mmap.mmap) -> np.ndarray:
    return np.frombuffer(mapping, np.int64, count=16)


def _dtype_field(mapping: mmap.mmap) -> np.ndarray:
    return np.frombuffer(mapping, np.uint8, count=_DTYPE_BYTES, offset=_DTYPE_AT)


def _read_dtype(mapping: mmap.mmap, name: str) -> np.dtype:
    text = _dtype_field(mapping).tobytes().rstrip(b"\0")
    try:
        return np.dtype(text.decode("ascii"))
    except (UnicodeDecodeError, TypeError) as error:
        msg = f"ring {name!r} has a corrupt dtype field {text!r}; recreate it (restart capture)"
        raise RingError(msg) from error


def _check_layout(name: str, slot_count: int, slot_shape: tuple[int, ...], dtype: np.dtype) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        msg = f"ring name {name!r} must be 1-200 characters from [A-Za-z0-9._-], starting with a letter or digit (it names /dev/shm/{name})"
        raise RingError(msg)
    if isinstance(slot_count, bool) or not isinstance(slot_count, int) or slot_count < 1:
        msg = f"ring {name!r}: slot_count must be an integer >= 1, got {slot_count!r}"
        raise RingError(msg)
    if (
        not isinstance(slot_shape, tuple)
        or not 1 <= len(slot_shape) <= _MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in slot_shape)
    ):
        msg = f"ring {name!r}: slot_shape must be a tuple of 1-{_MAX_NDIM} positive integers, got {slot_shape!r}"
        raise RingError(msg)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        msg = f"ring {name!r}: dtype must be a plain numeric dtype such as uint8 or float32, got {dtype}"
        raise RingError(msg)


class ShmRing:
    """A ring of `slot_count` slots, each an array of `slot_shape` and `dtype`, in one shared-memory segment."""

    def __init__(self, segment: _Segment, name: str, *, owner: bool) -> None:
        """Build the views of a validated segment; use create() or attach()."""
        self._shm, self._inode, mapping = segment.shm, segment.inode, segment.mapping
        self._owner = owner
        self._closed = False
        self.name = name
        self.reclaimed_count = 0  # slots taken back from a dead or late reader, for metrics
        self._base = np.frombuffer(mapping, np.uint8)  # every view derives from this one array
        words = _words(mapping)
        self.slot_count = int(words[2])
        self.slot_shape = tuple(int(d) for d in words[4 : 4 + int(words[3])])
        self.dtype = _read_dtype(mapping, name)
        stride, headers_at, payloads_at = int(words[13]), int(words[14]), int(words[15])
        self._headers = self._slice(headers_at, (self.slot_count, _SLOT_HEADER_WORDS), np.dtype(np.int64))
        self._arrays = [
            self._slice(payloads_at + i * stride, self.slot_shape, self.dtype) for i in range(self.slot_count)
        ]
        self._read_views = [array.view() for array in self._arrays]
        for view in self._read_views:
            view.flags.writeable = False
        self._addresses = [array.ctypes.data for array in self._arrays]
        self._next_slot = 0

    @classmethod
    def create(cls, name: str, *, slot_count: int, slot_shape: tuple[int, ...], dtype: DTypeLike) -> ShmRing:
        """Create the segment (replacing one left by a crashed run); this instance unlinks it on close()."""
        try:
            dtype = np.dtype(dtype)
        except TypeError as error:
            msg = f"ring {name!r}: dtype {dtype!r} is not a numpy dtype ({error})"
            raise RingError(msg) from error
        _check_layout(name, slot_count, slot_shape, dtype)
        payload_bytes = math.prod(slot_shape) * dtype.itemsize
        stride = _align(payload_bytes)
        payloads_at = _align(_RING_HEADER_BYTES + slot_count * _SLOT_HEADER_WORDS * 8)
        segment = cls._create_segment(name, payloads_at + slot_count * stride)
        mapping = segment.mapping
        words = _words(mapping)
        words[1:] = 0
        words[1], words[2], words[3] = LAYOUT_VERSION, slot_count, len(slot_shape)
        words[4 : 4 + len(slot_shape)] = slot_shape
        words[12], words[13], words[14], words[15] = payload_bytes, stride, _RING_HEADER_BYTES, payloads_at
        _dtype_field(mapping)[:] = np.frombuffer(dtype.str.encode("ascii").ljust(_DTYPE_BYTES, b"\0"), np.uint8)
        headers = np.frombuffer(mapping, np.int64, count=slot_count * _SLOT_HEADER_WORDS, offset=_RING_HEADER_BYTES)
        headers[:] = 0
        headers[_SEQ::_SLOT_HEADER_WORDS] = -1
        words[0] = MAGIC  # last: the segment is now valid for attach()
        log.info("ring %r created: %d slots of %s %s (%d bytes)", name, slot_count, slot_shape, dtype, len(mapping))
        return cls(segment, name, owner=True)

    @staticmethod
    def _create_segment(name: str, size: int) -> _Segment:
        leftover = Path(_SHM_DIR) / name
        if leftover.exists():
            try:
                leftover.unlink()
            except OSError as error:
                msg = (
                    f"ring {name!r}: {leftover} exists and cannot be removed ({error.strerror}): another user made it? "
                    f"Remove it as root, or run the agent under its systemd unit (a /dev/shm of its own)"
                )
                raise RingRefused(msg) from error
            log.warning("ring %r: removed a segment left in %s by an earlier run (did it crash?)", name, _SHM_DIR)
        free = shutil.disk_usage(_SHM_DIR).free
        if size > free:
            # tmpfs would accept the size and SIGBUS on the first write past the free space: refuse now.
            msg = f"ring {name!r} needs {size} bytes but {_SHM_DIR} has {free} free; use fewer slots or a larger {_SHM_DIR}"
            raise RingError(msg)
        try:
            return _open_segment(name, create=True, size=size)
        except OSError as error:
            msg = f"ring {name!r}: cannot create a {size}-byte shared-memory segment ({error})"
            raise RingError(msg) from error

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        """Map an existing ring; the layout comes from its header. Never unlinks it."""
        if not _NAME_PATTERN.fullmatch(name):
            msg = f"ring name {name!r} must be 1-200 characters from [A-Za-z0-9._-], starting with a letter or digit"
            raise RingError(msg)
        try:
            segment = _open_segment(name, create=False)
        except FileNotFoundError as error:
            msg = f"ring {name!r} does not exist in {_SHM_DIR}; start the process that creates it (capture) first"
            raise RingMissing(msg) from error
        except ValueError as error:  # an empty file cannot be mapped
            msg = f"segment {name!r} is empty: not a Lineguard ring"
            raise RingError(msg) from error
        cls._check_header(segment.mapping, name)  # on error, the mapping goes with this frame
        return cls(segment, name, owner=False)

    @staticmethod
    def _check_header(mapping: mmap.mmap, name: str) -> None:
        size = len(mapping)
        if size < _RING_HEADER_BYTES:
            msg = f"segment {name!r} is {size} bytes, too small for a ring header: not a Lineguard ring"
            raise RingError(msg)
        words = [int(w) for w in _words(mapping)]
        if words[0] != MAGIC:
            msg = f"segment {name!r} has no ring magic: not a Lineguard ring, or its creator has not finished"
            raise RingError(msg)
        if words[1] != LAYOUT_VERSION:
            msg = f"ring {name!r} has layout version {words[1]}, this agent reads {LAYOUT_VERSION}: processes from different agent versions?"
            raise RingError(msg)
        slot_count, ndim = words[2], words[3]
        shape = words[4 : 4 + ndim] if 1 <= ndim <= _MAX_NDIM else [0]
        payload_bytes, stride, headers_at, payloads_at = words[12:16]
        consistent = (
            slot_count >= 1
            and min(shape) >= 1
            and payload_bytes == math.prod(shape) * _read_dtype(mapping, name).itemsize
            and stride >= payload_bytes
            and headers_at == _RING_HEADER_BYTES
            and payloads_at >= headers_at + slot_count * _SLOT_HEADER_WORDS * 8
            and size >= payloads_at + slot_count * stride
        )
        if not consistent:
            msg = f"ring {name!r} has a corrupt header ({slot_count} slots of {shape}, {size}-byte segment); recreate it (restart capture)"
            raise RingError(msg)

    def _slice(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self._base[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def acquire(self, seq: int, *, now_ns: int, reclaim_after_ns: int) -> int | None:
        """Writer: claim a slot for frame `seq` (FREE -> WRITING); None when the ring is full. Never blocks.

        Free slots are taken in round-robin order. Only when none is free, the slot that has been WRITING or
        READY the longest is reclaimed if it is older than `reclaim_after_ns`: its reader is dead or late, and
        decision has already failed that frame at its deadline. `now_ns` is time.monotonic_ns().
        """
        if seq < 0:
            msg = f"ring {self.name!r}: seq must be >= 0, got {seq}"
            raise RingError(msg)
        self._check_open()
        states, t_states = self._headers[:, _STATE], self._headers[:, _T_STATE]
        for step in range(self.slot_count):
            slot = (self._next_slot + step) % self.slot_count
            if states[slot] == FREE:
                return self._claim(slot, seq, now_ns)
        oldest = int(np.argmin(t_states))
        if now_ns - int(t_states[oldest]) > reclaim_after_ns:
            self.reclaimed_count += 1
            return self._claim(oldest, seq, now_ns)
        return None

    def _claim(self, slot: int, seq: int, now_ns: int) -> int:
        header = self._headers[slot]
        header[_STATE] = WRITING  # first, so a reader checking the old seq sees a non-READY slot
        header[_SEQ] = seq
        header[_T_STATE] = now_ns
        header[_T_CAPTURE] = 0
        self._next_slot = (slot + 1) % self.slot_count
        return slot

    def array(self, slot: int) -> np.ndarray:
        """Writable view of slot `slot`'s payload: slot_shape, dtype. The same object on every call."""
        self._check_slot(slot)
        return self._arrays[slot]

    def address(self, slot: int) -> int:
        """Integer address of slot `slot`'s payload, for DMA (the GPU frame path reads ROIs from it)."""
        self._check_slot(slot)
        return self._addresses[slot]

    def segment(self) -> np.ndarray:
        """The whole mapped segment, (size,) uint8, e.g. to page-lock it for DMA; holding it keeps the mapping."""
        self._check_open()
        return self._base

    def relabel(self, slot: int, seq: int, new_seq: int) -> None:
        """Writer: give a WRITING slot claimed for `seq` the number `new_seq` instead.

        Capture claims a slot before the camera says which frames it lost; those lost frames take
        the earlier numbers, and the frame that did arrive takes the next one.
        """
        self._expect(slot, seq, WRITING, "reclaimed while it was being written: is the writer stalled?")
        self._headers[slot][_SEQ] = new_seq

    def publish(self, slot: int, seq: int, *, t_capture_ns: int) -> None:
        """Writer: mark the filled slot READY (WRITING -> READY). Send the ZeroMQ notification after this."""
        self._expect(slot, seq, WRITING, "reclaimed while it was being written: is the writer stalled?")
        header = self._headers[slot]
        header[_T_CAPTURE] = t_capture_ns
        header[_T_STATE] = time.monotonic_ns()
        # The payload was written before this line and the state word is written last. Readers learn of the
        # slot only from the ZeroMQ message sent after publish(); the socket syscalls between this store and
        # their reads order the memory accesses (also on ARM), so no lock is needed. Only one process per ring
        # calls acquire/publish and one calls release, and each checks seq, so a mixed-up slot is detected.
        header[_STATE] = READY

    def read(self, slot: int, seq: int) -> np.ndarray:
        """Read-only view of READY slot `slot`, which must hold `seq`; StaleSlotError otherwise.

        The writer reclaims a slot only after `reclaim_after_ns`; a reader that may be that late calls read()
        again after using the view, to learn whether the pixels changed under it.
        """
        self._expect(slot, seq, READY, "reclaimed or reused: was the reader late, or did capture restart?")
        return self._read_views[slot]

    def release(self, slot: int, seq: int) -> bool:
        """Free slot `slot` (READY or WRITING -> FREE) if it still holds `seq`; False if it was reclaimed.

        The writer may also release a WRITING slot it could not fill (e.g. a failed camera buffer).
        """
        self._check_slot(slot)
        header = self._headers[slot]
        if header[_SEQ] != seq or header[_STATE] == FREE:
            return False
        header[_STATE] = FREE
        return True

    def occupancy(self) -> int:
        """Number of slots not FREE."""
        self._check_open()
        return int(np.count_nonzero(self._headers[:, _STATE] != FREE))

    def close(self) -> None:
        """Detach (idempotent); the creator also unlinks. A view still held stays valid until it is dropped."""
        if self._closed:
            return
        self._closed = True
        # Only our own segment is unlinked: the name may already belong to a ring that replaced this one.
        ours = not self.replaced()
        # Dropping the views unmaps the segment, unless a caller still holds one (the last frame of its loop):
        # then the mapping goes with that view.
        del self._base, self._headers, self._arrays, self._read_views
        if self._owner and ours and _unlink_segment(self._shm):
            log.info("ring %r closed and unlinked", self.name)
        elif self._owner:
            log.warning("ring %r was unlinked or replaced by someone else before it closed", self.name)

    def replaced(self) -> bool:
        """True when the segment of this name is gone or is a newer one (capture restarted): attach again."""
        try:
            return (Path(_SHM_DIR) / self.name).stat().st_ino != self._inode
        except FileNotFoundError:
            return True

    def __enter__(self) -> ShmRing:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.occupancy()}/{self.slot_count} in use"
        return f"ShmRing({self.name!r}, {self.slot_shape} {self.dtype}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            msg = f"ring {self.name!r} is closed"
            raise RingError(msg)

    def _check_slot(self, slot: int) -> None:
        self._check_open()
        if not 0 <= slot < self.slot_count:
            msg = f"ring {self.name!r}: slot {slot} out of range 0..{self.slot_count - 1}"
            raise RingError(msg)

    def _expect(self, slot: int, seq: int, state: int, hint: str) -> None:
        self._check_slot(slot)
        header = self._headers[slot]
        held_seq, held_state = int(header[_SEQ]), int(header[_STATE])
        if held_seq != seq or held_state != state:
            msg = (
                f"ring {self.name!r} slot {slot} holds seq {held_seq} ({_STATE_NAMES.get(held_state, held_state)}), "
                f"expected seq {seq} ({_STATE_NAMES[state]}); {hint}"
            )
            raise StaleSlotError(msg)


class AttachedRings:
    """A reader's rings by name, attached on first use and again when their writer replaced them.

    Ring names are stable per camera (and one for the engine's maps): a restarted writer
    re-creates its ring under the same name, which the old attachment can detect (replaced()).
    """

    def __init__(self) -> None:
        self._rings: dict[str, ShmRing] = {}

    def get(self, name: str) -> ShmRing:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = ShmRing.attach(name)
        elif ring.replaced():
            try:
                newer = ShmRing.attach(name)
            except RingError:
                return ring  # unlinked by a writer that stopped: its frames stay readable through our mapping
            ring.close()
            ring = self._rings[name] = newer
        return ring

    def read(self, name: str, slot: int, seq: int) -> np.ndarray:
        """ShmRing.read through the cache; RingError (incl. StaleSlotError) when the frame is gone."""
        return self.get(name).read(slot, seq)

    def release(self, name: str, slot: int, seq: int) -> bool:
        """Free a slot; False when the slot or its whole ring is gone (its writer restarted)."""
        try:
            return self.get(name).release(slot, seq)
        except RingError:
            return False

    def occupancy(self) -> dict[str, int]:
        """Slots in use per attached ring, for metrics."""
        return {name: ring.occupancy() for name, ring in self._rings.items()}

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
