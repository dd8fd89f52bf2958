"""Live updates to every open page over server-sent events, without ever waiting for a browser.

Updates come from any thread (`publish`); the event loop fans them out in batches: everything that arrived
since the last flush goes out together, the verdicts of a line as one `verdicts` message. Each browser has
a bounded queue; one that falls behind (a slow link, a sleeping laptop) loses its queue and gets `resync`,
on which the page reloads its snapshot. The MQTT thread and the other browsers never notice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .drops import Drops

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
RETRY_MS = 2000  # the browser reconnects this long after losing the stream
BATCHED = "verdict"  # events of this kind are sent as one `verdicts` list per line and flush


class TooManyClients(Exception):
    """http.max_clients browsers already follow the feed; the page says to close one or raise the limit."""


@dataclass(frozen=True, slots=True)
class Event:
    """One update: its SSE event name, the line it concerns ("" = every line) and its JSON-ready data."""

    kind: str
    line: str
    data: Any


def sse(kind: str, data: Any) -> str:
    """One server-sent event; JSON has no raw newlines, so one `data:` line is enough."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


@dataclass(eq=False)
class _Client:
    line: str
    queue: asyncio.Queue[str]


class Hub:
    """Fan-out of Events to the browsers following each line."""

    def __init__(self, *, max_clients: int, client_queue: int, drops: Drops) -> None:
        self._max_clients = max_clients
        self._client_queue = client_queue
        self._drops = drops
        self._clients: set[_Client] = set()
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver on `loop` (the web server's); until then updates are dropped (no page is open anyway)."""
        self._loop = loop

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, event: Event) -> None:
        """Queue an update for the next flush; safe from any thread, never blocks."""
        loop = self._loop
        if loop is None or not self._clients:
            return
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop closed during shutdown
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
            self._scheduled = False
        messages = _encode(events)
        for client in list(self._clients):
            for line, text in messages:
                if line and client.line not in ("+", line):
                    continue
                if not _offer(client, text):
                    self._drops.drop("slow-browser", f"a browser following line {client.line} fell behind; resync")
                    break

    async def stream(self, line: str) -> AsyncIterator[str]:
        """The SSE text for one browser following `line` ('+' = every line), until it disconnects."""
        if len(self._clients) >= self._max_clients:
            msg = f"{self._max_clients} pages already follow the live feed (http.max_clients); close one"
            raise TooManyClients(msg)
        client = _Client(line, asyncio.Queue(maxsize=self._client_queue))
        self._clients.add(client)
        log.info("page opened for line %s (%d following)", line, len(self._clients))
        try:
            yield f"retry: {RETRY_MS}\n\n" + sse("hello", {"line": line})
            while True:
                try:
                    yield await asyncio.wait_for(client.queue.get(), timeout=KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
        finally:
            self._clients.discard(client)
            log.info("page closed for line %s (%d following)", line, len(self._clients))


def _encode(events: list[Event]) -> list[tuple[str, str]]:
    """(line, SSE text) per message: verdicts batched per line, everything else one message each, in order."""
    verdicts: dict[str, list[Any]] = {}
    messages: list[tuple[str, str]] = []
    for event in events:
        if event.kind == BATCHED:
            verdicts.setdefault(event.line, []).append(event.data)
        else:
            messages.append((event.line, sse(event.kind, event.data)))
    return [(line, sse("verdicts", items)) for line, items in verdicts.items()] + messages


def _offer(client: _Client, text: str) -> bool:
    """Queue `text` for the client; False (and a queued `resync` only) when its queue was full."""
    try:
        client.queue.put_nowait(text)
    except asyncio.QueueFull:
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(sse("resync", {"reason": "this page fell behind the line"}))
        return False
    return True
