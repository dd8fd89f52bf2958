"""The sample store on a real directory: budgets per camera and class, oldest-first eviction, restarts, atomicity."""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.agent.contract import Latency, Verdict
from lineguard.agent.samples.files import (
    MAP_FILE,
    VIEW_FILE,
    StoredLabel,
    find_sample,
    read_map,
    read_sample,
    sample_id_of,
    write_label,
)
from lineguard.agent.samples.store import Budgets, NewSample, SampleStore, SampleStoreError
from lineguard.trainer.data import read_image


def verdict(seq: int, *, camera: str = "top", kind: str = "reject") -> Verdict:
    failsafe = kind == "failsafe"
    return Verdict(
        agent_id="press-3",
        line="line-1",
        camera=camera,
        seq=seq,
        capture_ts=1_764_000_000.0 + seq,
        decided_ts=1_764_000_000.1 + seq,
        verdict="failsafe" if failsafe else "reject" if kind == "reject" else "accept",
        cause="engine-late" if failsafe else None,
        reason="test",
        score=None if failsafe else 0.7,
        threshold=0.6,
        model="brick@1.0.0",
        latency_ms=Latency(total=5.0),
    )


def sample(seq: int, *, camera: str = "top", kind: str = "reject", size: int = 32) -> NewSample:
    rng = np.random.default_rng(seq)
    view = rng.integers(0, 256, (size, size, 1), dtype=np.uint8)
    anomaly_map = rng.random((size, size), dtype=np.float32)
    return NewSample(kind, verdict(seq, camera=camera, kind=kind), view=view, anomaly_map=anomaly_map)  # type: ignore[arg-type]


def test_a_stored_sample_reads_back_with_its_exact_view_its_map_and_its_verdict(tmp_path):
    store = SampleStore(tmp_path, Budgets(10, 2**30))
    new = sample(7)
    stored = store.add(new)
    assert stored.sample_id == "top-7" and stored.path == tmp_path / "top" / "reject" / "top-7"
    info = read_sample(stored.path)
    assert info.meta.decision == new.verdict and info.meta.kind == "reject" and info.label is None
    assert np.array_equal(read_image(stored.path / VIEW_FILE), new.view[:, :, 0])
    np.testing.assert_allclose(read_map(stored.path / MAP_FILE), new.anomaly_map, atol=1e-3)
    assert find_sample(tmp_path, "top-7") == stored.path and find_sample(tmp_path, "top-8") is None


def test_each_class_of_each_camera_keeps_at_most_its_count_and_the_oldest_go_first(tmp_path):
    store = SampleStore(tmp_path, Budgets(3, 2**30))
    evicted = []
    for seq in range(1, 9):
        evicted += store.add(sample(seq)).evicted
        store.add(sample(seq, kind="close-call"))
        store.add(sample(seq, camera="side"))
    assert evicted == ["top-1", "top-2", "top-3", "top-4", "top-5"]
    for camera, kind in (("top", "reject"), ("top", "close-call"), ("side", "reject")):
        assert store.ids(camera, kind) == [f"{camera}-{seq}" for seq in (6, 7, 8)]
        assert len(list((tmp_path / camera / kind).iterdir())) == 3  # nothing left on disk beyond the budget


def test_the_byte_budget_holds_too(tmp_path):
    one = SampleStore(tmp_path / "probe", Budgets(10, 2**30)).add(sample(1)).n_bytes
    store = SampleStore(tmp_path / "store", Budgets(100, int(2.5 * one)))
    for seq in range(1, 7):
        store.add(sample(seq))
        assert store.bytes_held("top", "reject") <= 2.5 * one
    assert store.ids("top", "reject") == ["top-5", "top-6"]


def test_labelled_samples_are_evicted_only_when_no_unlabelled_one_is_left(tmp_path):
    store = SampleStore(tmp_path, Budgets(3, 2**30))
    for seq in (1, 2, 3):
        store.add(sample(seq))
    label = StoredLabel(label="ok", by="anna", labelled_ts=1.0, via="local")
    write_label(find_sample(tmp_path, "top-1"), label)  # type: ignore[arg-type]
    assert store.add(sample(4)).evicted == ("top-2",)
    assert store.add(sample(5)).evicted == ("top-3",)
    assert store.add(sample(6)).evicted == ("top-4",)
    assert store.ids("top", "reject") == ["top-1", "top-5", "top-6"]
    assert read_sample(find_sample(tmp_path, "top-1")).label == label  # type: ignore[arg-type]


def test_a_reopened_store_finds_its_samples_cleans_half_written_ones_and_applies_smaller_budgets(tmp_path):
    store = SampleStore(tmp_path, Budgets(10, 2**30))
    for seq in range(1, 6):
        store.add(sample(seq))
    (tmp_path / "top" / "reject" / ".incoming-top-9").mkdir()  # a crash mid-write
    (tmp_path / "top" / "reject" / ".evicted-top-0").mkdir()  # a crash mid-delete
    (tmp_path / "top" / "reject" / "top-99").mkdir()  # a folder without sample.json
    reopened = SampleStore(tmp_path, Budgets(10, 2**30))
    assert reopened.ids("top", "reject") == [f"top-{seq}" for seq in range(1, 6)]
    assert sorted(p.name for p in (tmp_path / "top" / "reject").iterdir()) == [f"top-{s}" for s in range(1, 6)]
    smaller = SampleStore(tmp_path, Budgets(2, 2**30))
    assert smaller.ids("top", "reject") == ["top-4", "top-5"]


def test_a_sample_is_not_written_when_the_file_system_would_fall_below_the_reserve(tmp_path):
    store = SampleStore(tmp_path, Budgets(10, 2**30, min_free_bytes=2**62))
    with pytest.raises(SampleStoreError, match="min_free_bytes"):
        store.add(sample(1))
    assert store.count() == 0 and not list(tmp_path.rglob("*.png"))


def test_the_same_frame_is_never_stored_twice(tmp_path):
    store = SampleStore(tmp_path, Budgets(10, 2**30))
    store.add(sample(1))
    with pytest.raises(SampleStoreError, match="stored already"):
        store.add(sample(1))


def test_a_failsafe_keeps_its_record_without_pixels(tmp_path):
    store = SampleStore(tmp_path, Budgets(10, 2**30))
    stored = store.add(NewSample("failsafe", verdict(3, kind="failsafe")))
    info = read_sample(stored.path)
    assert info.meta.decision.cause == "engine-late" and not info.meta.view and not (stored.path / VIEW_FILE).exists()


def test_sample_ids_are_topic_safe_for_any_camera_name():
    assert sample_id_of("top", 42) == "top-42"
    assert sample_id_of("_odd", 42).startswith("c") and sample_id_of("_odd", 42).endswith("-42")
    assert len(sample_id_of("x" * 64, 10**12)) <= 64
