"""Typed ZeroMQ messaging of messages.py records between agent processes, over ipc:// sockets in a run directory.

A Receiver (PULL) binds one endpoint and takes messages from any number of Senders (PUSH) that connect to it.
Sending never blocks: when the peer is absent or its queue is full, send() returns False and the caller decides
(usually an explicit failsafe). A malformed message is counted and skipped; it never stops a receiver.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import stat
import time
from pathlib import Path
from types import TracebackType

import zmq

from .messages import Message, decode, encode

log = logging.getLogger(__name__)

LINGER_MS = 100  # on close, unsent messages get this long to leave; closing never hangs longer
RECONNECT_IVL_MS = 20  # a sender notices a (re)started receiver within this; cheap on a local socket
MAX_MESSAGE_BYTES = 1 << 20  # our records are < 1 KiB; a peer sending more is disconnected by libzmq
MALFORMED_LOG_INTERVAL_S = 60.0
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class IpcError(Exception):
    """Bad endpoint name or path, or an endpoint already bound by a running process."""


def endpoint(run_dir: Path, name: str) -> str:
    """The ipc:// address of endpoint `name` in `run_dir`: "ipc://<run_dir>/<name>.sock" (absolute)."""
    if not _NAME_PATTERN.fullmatch(name):
        msg = f"endpoint name {name!r} must be 1-64 characters from [A-Za-z0-9._-], starting with a letter or digit"
        raise IpcError(msg)
    path = Path(run_dir).absolute() / f"{name}.sock"
    if len(str(path).encode()) > _SOCKET_PATH_MAX:
        msg = f"socket path {path} is longer than the {_SOCKET_PATH_MAX} bytes a Unix socket allows; use a shorter run directory"
        raise IpcError(msg)
    return f"ipc://{path}"


class Sender:
    """PUSH socket that connects to one Receiver; any number of Senders may connect to the same one."""

    def __init__(self, context: zmq.Context, address: str, *, high_water_mark: int = 10_000) -> None:
        """`high_water_mark`: messages queued here (beyond the receiver's own queue) before send() says False."""
        if isinstance(high_water_mark, bool) or not isinstance(high_water_mark, int) or high_water_mark < 1:
            msg = f"high_water_mark must be an integer >= 1, got {high_water_mark!r}"
            raise IpcError(msg)
        self.address = address
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._socket.setsockopt(zmq.SNDHWM, high_water_mark)
        self._socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        # Queue only on a completed connection: with no receiver there, send() fails at once instead of
        # filling a queue that nobody may ever read.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(address)

    def send(self, message: Message) -> bool:
        """Queue `message` without blocking; False when no receiver is connected or the queue is full."""
        try:
            self._socket.send(encode(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait until a receiver is connected (send() would queue); False after timeout_s.

        connect() returns before the handshake completes; a sender that must not lose its first
        message waits here once at start-up.
        """
        return bool(self._socket.poll(int(timeout_s * 1000), zmq.POLLOUT))

    def close(self) -> None:
        """Close the socket (idempotent); waits at most LINGER_MS for unsent messages."""
        self._socket.close()

    def __enter__(self) -> Sender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class Receiver:
    """PULL socket bound to `address`, taking messages from every Sender connected to it."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        """Bind `address`, replacing a socket file left by a dead process (IpcError if a live one holds it)."""
        self.address = address
        self.malformed_count = 0
        self._last_warning_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        if address.startswith("ipc://"):
            _remove_stale_socket(Path(address.removeprefix("ipc://")))
        self._socket = context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as error:
            self._socket.close()
            msg = f"cannot bind {address} ({error}); does its directory exist and is it writable?"
            raise IpcError(msg) from error

    def receive(self, timeout_ms: int) -> Message | None:
        """The next message, waiting up to `timeout_ms`; None on timeout. Malformed messages are skipped."""
        deadline_s = time.monotonic() + timeout_ms / 1000
        while True:
            remaining_ms = max(0, round((deadline_s - time.monotonic()) * 1000))
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return None
            message = self._take()
            if message is not None:
                return message
            if remaining_ms == 0:
                return None

    def receive_batch(self, max_count: int, timeout_ms: int) -> list[Message]:
        """Up to `max_count` messages: the first waits up to `timeout_ms`, the rest only if already queued."""
        first = self.receive(timeout_ms)
        if first is None:
            return []
        batch = [first]
        # At most max_count - 1 more reads, so a flood of malformed messages cannot hold the caller here.
        for _ in range(max_count - 1):
            if not self._socket.poll(0, zmq.POLLIN):
                break
            message = self._take()
            if message is not None:
                batch.append(message)
        return batch

    def close(self) -> None:
        """Close the socket (idempotent); libzmq removes the socket file."""
        self._socket.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _take(self) -> Message | None:
        """Read one queued message; None (counted, maybe logged) if it is malformed or already gone."""
        try:
            frames = self._socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) != 1:
            self._skip("multipart", f"{len(frames)}-part message; senders send one part")
            return None
        try:
            return decode(frames[0])
        except (ValueError, RecursionError) as error:
            # MessageError is a ValueError; json also raises plain ValueError (oversized integers) and
            # RecursionError (deep nesting) on hostile input.
            self._skip(" ".join(str(error).split()[:3]), str(error))
            return None

    def _skip(self, kind: str, reason: str) -> None:
        """Count a malformed message; warn at most once per `kind` (first words of the error) per interval."""
        self.malformed_count += 1
        now_s = time.monotonic()
        last_s = self._last_warning_s.get(kind)
        if last_s is not None and now_s - last_s < MALFORMED_LOG_INTERVAL_S:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last_warning_s[kind] = now_s
        suppressed = self._suppressed.pop(kind, 0)
        log.warning(
            "%s: skipped a malformed message: %s (%d more of this kind since its last warning; %d malformed in all)",
            self.address,
            reason[:300],
            suppressed,
            self.malformed_count,
        )


def _remove_stale_socket(path: Path) -> None:
    """Delete a socket file nobody listens on (its process died); IpcError if a live process still does."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        msg = f"{path} exists and is not a socket; refusing to replace it"
        raise IpcError(msg)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    else:
        msg = f"{path} is bound by a running process; is another agent using this run directory?"
        raise IpcError(msg)
    finally:
        probe.close()
    path.unlink(missing_ok=True)
    log.info("removed stale socket %s", path)
