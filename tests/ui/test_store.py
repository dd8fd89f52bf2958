"""The dashboard's SQLite file: verdict history (search, dedup, CSV, retention), gallery, alarms, labels, pushes."""

from __future__ import annotations

import csv
import io
import sqlite3
from pathlib import Path

import pytest

from lineguard.agent.contract import Latency, ModelEvent, SampleLabel, ShadowResult, Verdict
from lineguard.ui.alarms import Alarm
from lineguard.ui.config import StoreConfig
from lineguard.ui.drops import Drops
from lineguard.ui.history import HistoryQuery, HistoryReader
from lineguard.ui.store import GalleryEntry, LabelRow, Store, StoreError


def verdict(seq: int, *, kind: str = "accept", camera: str = "top", decided_ts: float | None = None) -> Verdict:
    decided = 1_000.0 + seq if decided_ts is None else decided_ts
    return Verdict(
        agent_id="press-3",
        line="line-1",
        camera=camera,
        seq=seq,
        capture_ts=decided - 0.05,
        decided_ts=decided,
        verdict=kind,  # type: ignore[arg-type]
        cause="engine-late" if kind == "failsafe" else None,
        reason=f"frame {seq}",
        score=None if kind == "failsafe" else 0.1 * (seq % 10),
        threshold=0.42,
        model="brick@1.0.0",
        latency_ms=Latency(capture_to_engine=1.0, inference=30.0, total=40.0 + seq),
    )


@pytest.fixture
def store(tmp_path: Path):
    opened = Store(tmp_path / "ui.sqlite3", StoreConfig(flush_interval_ms=20), Drops())
    yield opened
    opened.close()


def test_verdicts_come_back_as_the_records_that_were_stored_and_duplicates_are_ignored(store):
    published = [verdict(seq, kind=("reject" if seq % 4 == 0 else "accept")) for seq in range(1, 41)]
    for each in [*published, published[3], published[7]]:  # QoS 1 may deliver twice
        store.add_verdict(each)
    store.flush()
    rows, total = HistoryReader(store).page(HistoryQuery(0, 2_000), limit=100)
    assert total == 40
    assert [v for _, v in reversed(rows)] == published


def test_history_filters_by_time_camera_verdict_and_model_and_pages_newest_first(store):
    for seq in range(1, 31):
        store.add_verdict(
            verdict(seq, kind="reject" if seq % 3 == 0 else "accept", camera="side" if seq % 2 else "top")
        )
    store.flush()
    reader = HistoryReader(store)
    rows, total = reader.page(HistoryQuery(1_010, 1_020, camera="top", verdict="reject"), limit=100)
    assert [v.seq for _, v in rows] == [18, 12] and total == 2
    assert reader.page(HistoryQuery(0, 2_000, model="other@1"), limit=10)[1] == 0
    first, total = reader.page(HistoryQuery(0, 2_000), limit=10)
    second, _ = reader.page(HistoryQuery(0, 2_000, before_id=first[-1][0]), limit=10)
    assert [v.seq for _, v in first + second] == list(range(30, 10, -1)) and total == 30


def test_the_csv_export_has_every_matching_row_with_a_header_from_the_contract(store):
    for seq in range(1, 1201):
        store.add_verdict(verdict(seq, kind="failsafe" if seq == 7 else "accept"))
    store.flush()
    text = "".join(HistoryReader(store).csv_lines(HistoryQuery(0, 5_000)))
    table = list(csv.DictReader(io.StringIO(text)))
    assert len(table) == 1200
    assert table[6]["verdict"] == "failsafe" and table[6]["cause"] == "engine-late" and table[6]["score"] == ""
    assert table[0]["latency_ms_total"] == "41.0" and table[-1]["seq"] == "1200"


def test_retention_deletes_old_verdicts_and_caps_gallery_images_per_camera(tmp_path):
    config = StoreConfig(retention_days=1, images_per_camera=10, flush_interval_ms=20)
    store = Store(tmp_path / "ui.sqlite3", config, Drops())
    now = 10 * 86400.0
    for seq in range(1, 101):
        store.add_verdict(verdict(seq, decided_ts=now - 2 * 86400 if seq <= 60 else now - 60))
    for seq in range(1, 26):
        store.put_gallery(entry(seq, received_ts=now - seq), heatmap=b"\xff\xd8jpeg")
    store.flush()
    store.prune(now)
    assert HistoryReader(store).page(HistoryQuery(0, now), limit=1000)[1] == 40
    assert [each.seq for each in store.gallery("line-1", limit=100, kinds=("reject",))] == list(range(1, 11))
    store.close()


def entry(seq: int, **changes: object) -> GalleryEntry:
    values: dict[str, object] = {
        "agent_id": "press-3",
        "line": "line-1",
        "camera": "top",
        "seq": seq,
        "kind": "reject",
        "verdict": "reject",
        "score": 0.6,
        "threshold": 0.42,
        "model": "brick@1.0.0",
        "reason": "score 0.60 >= threshold 0.42",
        "capture_ts": 1_000.0,
        "received_ts": 1_000.5,
    }
    return GalleryEntry(**{**values, **changes})  # type: ignore[arg-type]


def test_a_gallery_entry_keeps_its_heatmap_when_the_sample_arrives_later_and_vice_versa(store):
    store.put_gallery(entry(5, image_format="jpeg"), heatmap=b"HEATMAP")
    store.put_gallery(entry(5, sample_id="s-5"), thumbnail=b"THUMB")
    store.put_gallery(entry(6, sample_id="s-6"), thumbnail=b"THUMB6")
    store.put_gallery(entry(6, image_format="jpeg"), heatmap=b"HEATMAP6")
    store.flush()
    for seq in (5, 6):
        found = store.gallery_entry("press-3", "top", seq)
        assert found is not None and found.sample_id == f"s-{seq}" and found.image_format == "jpeg"
    assert store.gallery_image("press-3", "top", 5) == ("image/jpeg", b"HEATMAP")
    assert store.gallery_image("press-3", "top", 6) == ("image/jpeg", b"HEATMAP6")
    store.put_gallery(entry(7, sample_id="s-7"), thumbnail=b"ONLY")
    store.flush()
    assert store.gallery_image("press-3", "top", 7) == ("image/jpeg", b"ONLY")


def test_alarms_labels_and_pushes_survive_reopening_the_file(tmp_path):
    path = tmp_path / "ui.sqlite3"
    store = Store(path, StoreConfig(), Drops())
    alarm = Alarm(
        1,
        "agent-offline:press-3",
        "agent-offline",
        "line-1",
        "press-3",
        "",
        "critical",
        "offline",
        10.0,
        False,
        11.0,
        "anna",
        12.0,
    )
    store.save_alarm(alarm)
    store.put_gallery(entry(5, sample_id="s-5"))
    store.flush()
    label = SampleLabel(
        agent_id="press-3",
        sample_id="s-5",
        label="nok",
        defect_type="crack",
        by="anna",
        request_id="r1",
        issued_ts=20.0,
        nonce="n1",
    )
    row = LabelRow("r1", "press-3", "s-5", "top", 5, "nok", "crack", "anna", 20.0)
    store.save_label(row, label)
    event = ModelEvent(
        agent_id="press-3",
        action="push",
        request_id="p1",
        outcome="accepted",
        model="brick@2.0.0",
        serving="brick@2.0.0",
        reason="ok",
        shadow=ShadowResult(frames=10, serving_reject_rate=0.1, candidate_reject_rate=0.2),
        ts=30.0,
    )
    store.add_push(event)
    store.add_push(event)  # redelivered
    store.close()
    reopened = Store(path, StoreConfig(), Drops())
    assert reopened.alarm_history(10) == [alarm]
    assert reopened.open_alarms() == []  # acknowledged and over: closed
    assert reopened.labels(limit=10) == [row] and reopened.signed_label("r1") == label
    assert reopened.gallery_entry("press-3", "top", 5).label == "nok"
    assert reopened.label_result("r1", "press-3", "stored", "", 21.0).outcome == "stored"
    assert reopened.pushes(limit=10) == [event]
    reopened.close()


def test_a_file_of_another_schema_version_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "ui.sqlite3"
    Store(path, StoreConfig(), Drops()).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(StoreError, match=r"schema 99.*move it aside"):
        Store(path, StoreConfig(), Drops())


def test_a_full_write_queue_drops_and_counts_instead_of_blocking_the_feed(tmp_path):
    drops = Drops()
    path = tmp_path / "ui.sqlite3"
    store = Store(path, StoreConfig(max_pending_rows=1000, flush_interval_ms=20), drops)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the disk is stuck: the writer waits on its first batch
    try:
        for seq in range(5000):
            store.add_verdict(verdict(seq))  # never blocks
        assert drops.total("store-full") >= 5000 - 1000 - 2000  # queue + one batch in the writer's hands
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    kept = HistoryReader(store).page(HistoryQuery(0, 10_000), limit=1)[1]
    assert kept + drops.total("store-full") == 5000
    store.close()
