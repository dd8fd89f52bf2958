"""The dashboard's SQLite file: verdict history (with retention), the reject gallery, alarms and their
acknowledgements, labels sent, and the model push history.

One file in WAL mode: readers (the web server's threads) never wait for the writer. Verdicts and gallery
entries arrive on the MQTT thread at line rate; they are queued and written in batches by one writer thread,
so the broker subscription never waits for the disk. Alarms, acknowledgements, labels and pushes are rare
and must survive a crash the moment they are shown: they are written at once, on the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lineguard.agent.contract import ContractError, ModelEvent, SampleLabel, Verdict, decode

from .alarms import Alarm
from .config import StoreConfig
from .drops import Drops
from .history import VERDICT_COLUMNS, verdict_row

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BATCH_ROWS = 2000  # most rows in one transaction
PRUNE_EVERY_S = 600.0
PRUNE_CHUNK_ROWS = 20_000  # rows deleted per transaction, so readers and the writer are never held long


class StoreError(Exception):
    """The SQLite file cannot be opened or has another schema; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class GalleryEntry:
    """A reject, failsafe or stored sample with its image: what the gallery shows and what can be labelled.

    capture_ts and received_ts are Unix seconds; image_format is the heatmap's ("" while none has arrived).
    """

    agent_id: str
    line: str
    camera: str
    seq: int
    kind: str
    verdict: str
    score: float | None
    threshold: float | None
    model: str
    reason: str
    capture_ts: float
    received_ts: float
    image_format: str = ""
    sample_id: str = ""
    label: str = ""


@dataclass(frozen=True, slots=True)
class LabelRow:
    """A label this dashboard signed and sent, and the agent's answer (outcome "sent" until it comes)."""

    request_id: str
    agent_id: str
    sample_id: str
    camera: str
    seq: int
    label: str
    defect_type: str
    by: str
    issued_ts: float
    outcome: str = "sent"
    reason: str = ""
    result_ts: float | None = None


_GALLERY_KEYS = tuple(field.name for field in fields(GalleryEntry))
_ALARM_KEYS = tuple(field.name for field in fields(Alarm))
_LABEL_KEYS = tuple(field.name for field in fields(LabelRow))


def _schema() -> str:
    verdict_columns = ", ".join(f"{name} {kind}" for name, kind in VERDICT_COLUMNS)
    return f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts ({verdict_columns});
CREATE UNIQUE INDEX IF NOT EXISTS verdicts_key ON verdicts (agent_id, camera, seq, decided_ts);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts (decided_ts);
CREATE TABLE IF NOT EXISTS gallery (
    agent_id TEXT NOT NULL, line TEXT NOT NULL, camera TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    verdict TEXT NOT NULL, score REAL, threshold REAL, model TEXT NOT NULL, reason TEXT NOT NULL,
    capture_ts REAL NOT NULL, received_ts REAL NOT NULL, image_format TEXT NOT NULL, sample_id TEXT NOT NULL,
    label TEXT NOT NULL, image BLOB, thumbnail BLOB, PRIMARY KEY (agent_id, camera, seq));
CREATE INDEX IF NOT EXISTS gallery_time ON gallery (received_ts);
CREATE TABLE IF NOT EXISTS alarms (
    alarm_id INTEGER PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, line TEXT NOT NULL, subject TEXT NOT NULL,
    camera TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL, raised_ts REAL NOT NULL,
    active INTEGER NOT NULL, cleared_ts REAL, acked_by TEXT NOT NULL, acked_ts REAL, count INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS alarms_time ON alarms (raised_ts);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, sample_id TEXT NOT NULL, camera TEXT NOT NULL,
    seq INTEGER NOT NULL, label TEXT NOT NULL, defect_type TEXT NOT NULL, by TEXT NOT NULL, issued_ts REAL NOT NULL,
    outcome TEXT NOT NULL, reason TEXT NOT NULL, result_ts REAL, signed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pushes (
    agent_id TEXT NOT NULL, request_id TEXT NOT NULL, ts REAL NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (agent_id, request_id, ts));
"""


class Store:
    """The SQLite file at `path`, created if missing; a writer thread runs until close()."""

    def __init__(self, path: Path, config: StoreConfig, drops: Drops) -> None:
        self.path = path
        self.config = config
        self._drops = drops
        self._local = threading.local()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=config.max_pending_rows)
        self._closing = threading.Event()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._create()
        except (OSError, sqlite3.Error) as error:
            msg = f"cannot open the dashboard database {path}: {error}; check state_dir and its permissions"
            raise StoreError(msg) from error
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    # -- connections ----------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a power cut loses at most the last commit
        connection.execute("PRAGMA busy_timeout=10000")
        return connection

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections are not shared between threads here)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _create(self) -> None:
        self._db.executescript(_schema())  # CREATE ... IF NOT EXISTS: safe to repeat, each statement atomic
        with self._transaction() as db:
            found = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if found is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif found[0] != str(SCHEMA_VERSION):
                msg = f"{self.path} has schema {found[0]}, this dashboard writes {SCHEMA_VERSION}: move it aside"
                raise StoreError(msg)

    # -- queued writes (line rate) --------------------------------------------------------------------------------

    def add_verdict(self, verdict: Verdict) -> None:
        self._put("verdict", verdict_row(verdict))

    def put_gallery(self, entry: GalleryEntry, *, heatmap: bytes | None = None, thumbnail: bytes | None = None) -> None:
        """Insert or complete a gallery entry: its verdict first, then its heatmap or its sample (either order)."""
        self._put("gallery", (entry, heatmap, thumbnail))

    def _put(self, kind: str, item: Any) -> None:
        try:
            self._queue.put_nowait((kind, item))
        except queue.Full:
            self._drops.drop("store-full", f"{self.config.max_pending_rows} rows wait for the disk; {kind} dropped")

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("flush", done))
        if not done.wait(timeout_s):
            msg = f"the dashboard database writer did not catch up within {timeout_s} s"
            raise StoreError(msg)

    def _write_loop(self) -> None:
        next_prune = time.monotonic() + 5.0
        wait_s = self.config.flush_interval_ms / 1e3
        while not self._closing.is_set() or not self._queue.empty():
            batch = self._take_batch(wait_s)
            try:
                self._write(batch)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY_S
                    self.prune(time.time())
            except sqlite3.Error as error:  # the disk is full or gone: count the loss, keep the feed alive
                self._drops.drop("store-write-failed", f"{len(batch)} rows not written to {self.path}: {error}")
            for kind, item in batch:
                if kind == "flush":
                    item.set()

    def _take_batch(self, wait_s: float) -> list[tuple[str, Any]]:
        try:
            batch = [self._queue.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_ROWS:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        verdicts = [item for kind, item in batch if kind == "verdict"]
        gallery = [item for kind, item in batch if kind == "gallery"]
        if not verdicts and not gallery:
            return
        placeholders = ", ".join("?" * len(VERDICT_COLUMNS))
        with self._transaction() as db:
            db.executemany(f"INSERT OR IGNORE INTO verdicts VALUES ({placeholders})", verdicts)
            for entry, heatmap, thumbnail in gallery:
                self._upsert_gallery(db, entry, heatmap, thumbnail)

    @staticmethod
    def _upsert_gallery(
        db: sqlite3.Connection, entry: GalleryEntry, heatmap: bytes | None, thumbnail: bytes | None
    ) -> None:
        """Images, sample id and label already stored are kept when a later message lacks them."""
        columns = (*_GALLERY_KEYS, "image", "thumbnail")
        db.execute(
            f"""INSERT INTO gallery ({", ".join(columns)}) VALUES ({", ".join("?" * len(columns))})
            ON CONFLICT (agent_id, camera, seq) DO UPDATE SET
                kind = excluded.kind, verdict = excluded.verdict, score = excluded.score,
                threshold = excluded.threshold, model = excluded.model, reason = excluded.reason,
                capture_ts = excluded.capture_ts,
                image_format = CASE WHEN excluded.image IS NULL THEN gallery.image_format ELSE excluded.image_format END,
                image = COALESCE(excluded.image, gallery.image),
                thumbnail = COALESCE(excluded.thumbnail, gallery.thumbnail),
                sample_id = CASE WHEN excluded.sample_id = '' THEN gallery.sample_id ELSE excluded.sample_id END,
                label = CASE WHEN excluded.label = '' THEN gallery.label ELSE excluded.label END""",
            (*astuple_gallery(entry), heatmap, thumbnail),
        )

    # -- retention ------------------------------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Delete what is older than retention_days and gallery images past images_per_camera; rows deleted."""
        cutoff = now - self.config.retention_days * 86400.0
        deleted = 0
        for table, column in (("verdicts", "decided_ts"), ("gallery", "received_ts"), ("pushes", "ts")):
            deleted += self._delete_chunked(f"SELECT rowid FROM {table} WHERE {column} < ?", table, (cutoff,))
        with self._transaction() as db:
            deleted += db.execute(
                "DELETE FROM alarms WHERE acked_ts IS NOT NULL AND active = 0 AND raised_ts < ?", (cutoff,)
            ).rowcount
            deleted += db.execute("DELETE FROM labels WHERE issued_ts < ?", (cutoff,)).rowcount
        over = """SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER (PARTITION BY agent_id, camera
                  ORDER BY received_ts DESC) AS rank FROM gallery) WHERE rank > ?"""
        deleted += self._delete_chunked(over, "gallery", (self.config.images_per_camera,))
        if deleted:
            log.info(
                "retention: deleted %d rows older than %.0f days or past the gallery cap",
                deleted,
                self.config.retention_days,
            )
        return deleted

    def _delete_chunked(self, select: str, table: str, parameters: tuple[Any, ...]) -> int:
        deleted = 0
        while True:
            with self._transaction() as db:
                count = db.execute(
                    f"DELETE FROM {table} WHERE rowid IN ({select} LIMIT {PRUNE_CHUNK_ROWS})", parameters
                ).rowcount
            deleted += count
            if count < PRUNE_CHUNK_ROWS:
                return deleted

    # -- gallery reads --------------------------------------------------------------------------------------------

    def gallery(self, line: str, *, limit: int, kinds: tuple[str, ...]) -> list[GalleryEntry]:
        """The newest entries of `line` (or every line for '+') whose kind is in `kinds`."""
        marks = ", ".join("?" * len(kinds))
        where = f"kind IN ({marks})" + ("" if line == "+" else " AND line = ?")
        parameters: tuple[Any, ...] = (*kinds,) if line == "+" else (*kinds, line)
        rows = self._db.execute(
            f"SELECT {', '.join(_GALLERY_KEYS)} FROM gallery WHERE {where} ORDER BY received_ts DESC LIMIT ?",
            (*parameters, limit),
        ).fetchall()
        return [GalleryEntry(*row) for row in rows]

    def gallery_entry(self, agent_id: str, camera: str, seq: int) -> GalleryEntry | None:
        row = self._db.execute(
            f"SELECT {', '.join(_GALLERY_KEYS)} FROM gallery WHERE agent_id = ? AND camera = ? AND seq = ?",
            (agent_id, camera, seq),
        ).fetchone()
        return None if row is None else GalleryEntry(*row)

    def gallery_image(self, agent_id: str, camera: str, seq: int) -> tuple[str, bytes] | None:
        """(content type, bytes) of the entry's heatmap, else of its sample thumbnail; None when it has neither."""
        row = self._db.execute(
            "SELECT image_format, image, thumbnail FROM gallery WHERE agent_id = ? AND camera = ? AND seq = ?",
            (agent_id, camera, seq),
        ).fetchone()
        if row is None or (row[1] is None and row[2] is None):
            return None
        return (f"image/{row[0]}", row[1]) if row[1] is not None else ("image/jpeg", row[2])

    # -- alarms (written at once) ---------------------------------------------------------------------------------

    def save_alarm(self, alarm: Alarm) -> None:
        values = asdict(alarm)
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO alarms ({', '.join(_ALARM_KEYS)}) VALUES ({', '.join('?' * len(_ALARM_KEYS))})",
                tuple(values[key] for key in _ALARM_KEYS),
            )

    def open_alarms(self) -> list[Alarm]:
        """Alarms still shown: not acknowledged, or acknowledged but still active."""
        rows = self._db.execute(
            f"SELECT {', '.join(_ALARM_KEYS)} FROM alarms WHERE acked_ts IS NULL OR active = 1"
        ).fetchall()
        return [_alarm_of(row) for row in rows]

    def alarm_history(self, limit: int) -> list[Alarm]:
        rows = self._db.execute(
            f"SELECT {', '.join(_ALARM_KEYS)} FROM alarms ORDER BY raised_ts DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_alarm_of(row) for row in rows]

    def next_alarm_id(self) -> int:
        found = self._db.execute("SELECT MAX(alarm_id) FROM alarms").fetchone()[0]
        return int(found or 0) + 1

    # -- labels ---------------------------------------------------------------------------------------------------

    def save_label(self, row: LabelRow, signed: SampleLabel) -> None:
        values = asdict(row)
        with self._transaction() as db:
            db.execute(
                f"INSERT OR REPLACE INTO labels ({', '.join(_LABEL_KEYS)}, signed) VALUES ({', '.join('?' * (len(_LABEL_KEYS) + 1))})",
                (*(values[key] for key in _LABEL_KEYS), signed.encode()),
            )
            db.execute(
                "UPDATE gallery SET label = ? WHERE agent_id = ? AND camera = ? AND seq = ?",
                (row.label, row.agent_id, row.camera, row.seq),
            )

    def label_result(self, request_id: str, agent_id: str, outcome: str, reason: str, ts: float) -> LabelRow | None:
        """Record the agent's answer to a label this dashboard sent; None for a request it did not send."""
        with self._transaction() as db:
            db.execute(
                "UPDATE labels SET outcome = ?, reason = ?, result_ts = ? WHERE request_id = ? AND agent_id = ?",
                (outcome, reason, ts, request_id, agent_id),
            )
        return self.label(request_id)

    def label(self, request_id: str) -> LabelRow | None:
        row = self._db.execute(
            f"SELECT {', '.join(_LABEL_KEYS)} FROM labels WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else LabelRow(*row)

    def labels(self, *, limit: int, agent_id: str = "", sample_id: str = "") -> list[LabelRow]:
        where, parameters = _filters({"agent_id": agent_id, "sample_id": sample_id})
        rows = self._db.execute(
            f"SELECT {', '.join(_LABEL_KEYS)} FROM labels {where} ORDER BY issued_ts DESC LIMIT ?", (*parameters, limit)
        ).fetchall()
        return [LabelRow(*row) for row in rows]

    def signed_label(self, request_id: str) -> SampleLabel | None:
        row = self._db.execute("SELECT signed FROM labels WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else decode(SampleLabel, row[0])

    # -- pushes ---------------------------------------------------------------------------------------------------

    def add_push(self, event: ModelEvent) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO pushes VALUES (?, ?, ?, ?)",
                (event.agent_id, event.request_id, event.ts, event.encode()),
            )

    def pushes(self, *, limit: int, agent_id: str = "") -> list[ModelEvent]:
        """Model events, newest first; a row that no longer decodes (hand-edited file) is skipped and counted."""
        where, parameters = _filters({"agent_id": agent_id})
        rows = self._db.execute(
            f"SELECT record FROM pushes {where} ORDER BY ts DESC LIMIT ?", (*parameters, limit)
        ).fetchall()
        events = []
        for (record,) in rows:
            try:
                events.append(decode(ModelEvent, record))
            except ContractError as error:
                self._drops.drop("stored-push-unreadable", str(error))
        return events

    # -- generic reads --------------------------------------------------------------------------------------------

    def read(self, query: str, parameters: tuple[Any, ...], *, size: int = 500) -> Iterator[tuple[Any, ...]]:
        """Rows of a read-only query, fetched `size` at a time on a connection of its own (streamed exports)."""
        connection = self._connect()
        try:
            cursor = connection.execute(query, parameters)
            while rows := cursor.fetchmany(size):
                yield from rows
        finally:
            connection.close()

    def scalar(self, query: str, parameters: tuple[Any, ...]) -> Any:
        return self._db.execute(query, parameters).fetchone()[0]

    def close(self) -> None:
        self._closing.set()
        self._writer.join(timeout=30)
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()


def _alarm_of(row: tuple[Any, ...]) -> Alarm:
    values = dict(zip(_ALARM_KEYS, row, strict=True))
    values["active"] = bool(values["active"])  # SQLite keeps booleans as 0/1
    return Alarm(**values)


def astuple_gallery(entry: GalleryEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, key) for key in _GALLERY_KEYS)


def _filters(equal: dict[str, str]) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause for the non-empty `column = value` pairs (column names are ours, never the caller's)."""
    used = {column: value for column, value in equal.items() if value}
    if not used:
        return "", ()
    return "WHERE " + " AND ".join(f"{column} = ?" for column in used), tuple(used.values())


Persist = Callable[[Alarm], None]
