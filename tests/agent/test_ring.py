"""ShmRing with real POSIX shared memory and real separate processes (subprocess and multiprocessing spawn)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from lineguard.agent.ring import RingError, ShmRing, StaleSlotError

SHM = Path("/dev/shm")
SECOND_NS = 1_000_000_000

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs Linux /dev/shm")


@pytest.fixture
def ring_name():
    name = f"lgtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield name
    (SHM / name).unlink(missing_ok=True)  # whatever a failed test left behind


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (its own resource tracker, like a separately started agent process)."""
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def pattern(seq: int, shape: tuple[int, ...]) -> np.ndarray:
    """The fake camera's Mono8 content, (x + y + seq) % 255, broadcast over channels: every byte is checkable."""
    y, x = np.indices(shape[:2])
    image = ((x + y + seq) % 255).astype(np.uint8)
    return np.broadcast_to(image[..., None], shape) if len(shape) == 3 else image


def write_frames(name: str, count: int, queue: multiprocessing.Queue) -> None:
    """Child process: attach, write `count` frames, announce (slot, seq) for each after publish()."""
    with ShmRing.attach(name) as ring:
        for seq in range(count):
            slot = ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10 * SECOND_NS)
            while slot is None:  # full: wait for the reader (capture would fail this frame instead)
                time.sleep(0.001)
                slot = ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=10 * SECOND_NS)
            ring.array(slot)[:] = pattern(seq, ring.slot_shape)
            ring.publish(slot, seq, t_capture_ns=time.time_ns())
            queue.put((slot, seq))


def test_pixels_written_by_one_process_are_read_intact_by_another(ring_name):
    shape = (48, 64, 3)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with ShmRing.create(ring_name, slot_count=4, slot_shape=shape, dtype="uint8") as ring:
        writer = context.Process(target=write_frames, args=(ring_name, 12, queue))
        writer.start()
        for expected_seq in range(12):
            slot, seq = queue.get(timeout=20)
            assert seq == expected_seq
            np.testing.assert_array_equal(ring.read(slot, seq), pattern(seq, shape))
            assert ring.release(slot, seq)
        writer.join(timeout=20)
        assert writer.exitcode == 0
        assert ring.occupancy() == 0


def test_attach_in_another_process_reads_the_layout_and_pixels(ring_name):
    with ShmRing.create(ring_name, slot_count=3, slot_shape=(5, 7), dtype=np.float32) as ring:
        slot = ring.acquire(41, now_ns=time.monotonic_ns(), reclaim_after_ns=SECOND_NS)
        ring.array(slot)[:] = np.arange(35, dtype=np.float32).reshape(5, 7) / 7
        ring.publish(slot, 41, t_capture_ns=123)
        result = run_python(
            """
            import json, sys
            from lineguard.agent.ring import ShmRing
            with ShmRing.attach(sys.argv[1]) as ring:
                total = float(ring.read(int(sys.argv[2]), 41).sum())
                print(json.dumps([ring.slot_count, ring.slot_shape, ring.dtype.str, total]))
            """,
            ring_name,
            str(slot),
        )
        assert result.returncode == 0, result.stderr
        slot_count, slot_shape, dtype, total = json.loads(result.stdout)
        assert (slot_count, tuple(slot_shape), np.dtype(dtype)) == (3, (5, 7), np.dtype(np.float32))
        assert total == pytest.approx(float(np.arange(35).sum() / 7), rel=1e-6)


def test_a_slot_that_does_not_hold_the_expected_seq_raises_stale_slot_error(ring_name):
    with ShmRing.create(ring_name, slot_count=4, slot_shape=(8,), dtype="uint8") as ring:
        slot = ring.acquire(41, now_ns=time.monotonic_ns(), reclaim_after_ns=SECOND_NS)
        with pytest.raises(StaleSlotError, match="WRITING"):
            ring.read(slot, 41)  # not published yet
        ring.publish(slot, 41, t_capture_ns=0)
        with pytest.raises(StaleSlotError, match=rf"ring '{ring_name}' slot {slot} holds seq 41 .*expected seq 42"):
            ring.read(slot, 42)
        assert ring.release(slot, 41)
        with pytest.raises(StaleSlotError, match="FREE"):
            ring.read(slot, 41)


def test_acquire_returns_none_when_full_then_reclaims_the_oldest_expired_slot(ring_name):
    with ShmRing.create(ring_name, slot_count=3, slot_shape=(4, 4), dtype="uint8") as ring:
        now = time.monotonic_ns()
        slots = [ring.acquire(seq, now_ns=now + seq, reclaim_after_ns=SECOND_NS) for seq in range(3)]
        assert slots == [0, 1, 2] and ring.occupancy() == 3
        ring.publish(1, 1, t_capture_ns=0)
        assert ring.acquire(3, now_ns=now + 10, reclaim_after_ns=SECOND_NS) is None
        # Slot 0 (WRITING since `now`) is the oldest; slot 1 was published later.
        assert ring.acquire(3, now_ns=now + 2 * SECOND_NS, reclaim_after_ns=SECOND_NS) == 0
        assert ring.reclaimed_count == 1 and ring.occupancy() == 3
        with pytest.raises(StaleSlotError, match="holds seq 3"):
            ring.publish(0, 0, t_capture_ns=0)  # the old writer of seq 0 finds its slot taken


def test_release_of_a_reclaimed_slot_returns_false_and_its_reader_gets_stale_slot_error(ring_name):
    with ShmRing.create(ring_name, slot_count=1, slot_shape=(4,), dtype="uint8") as ring:
        now = time.monotonic_ns()
        ring.acquire(7, now_ns=now, reclaim_after_ns=SECOND_NS)
        ring.publish(0, 7, t_capture_ns=0)
        later = time.monotonic_ns() + 2 * SECOND_NS
        assert ring.acquire(8, now_ns=later, reclaim_after_ns=SECOND_NS) == 0
        assert not ring.release(0, 7)
        with pytest.raises(StaleSlotError, match="holds seq 8"):
            ring.read(0, 7)
        assert ring.release(0, 8)  # the writer gives back a slot it could not fill
        assert ring.occupancy() == 0 and not ring.release(0, 8)


def test_free_slots_are_used_round_robin_before_any_is_reclaimed(ring_name):
    with ShmRing.create(ring_name, slot_count=3, slot_shape=(2,), dtype="uint8") as ring:
        taken = []
        for seq in range(6):
            slot = ring.acquire(seq, now_ns=time.monotonic_ns(), reclaim_after_ns=0)
            taken.append(slot)
            ring.publish(slot, seq, t_capture_ns=0)
            ring.release(slot, seq)
        assert taken == [0, 1, 2, 0, 1, 2] and ring.reclaimed_count == 0


def test_an_attaching_process_that_exits_does_not_unlink_the_segment_and_close_does(ring_name):
    attach_and_exit = """
        import sys
        from lineguard.agent.ring import ShmRing
        ring = ShmRing.attach(sys.argv[1])
        print(ring.slot_count)
    """
    ring = ShmRing.create(ring_name, slot_count=2, slot_shape=(16,), dtype="uint8")
    for _ in range(2):
        result = run_python(attach_and_exit, ring_name)
        assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr
        assert "leaked" not in result.stderr
    assert (SHM / ring_name).exists()
    assert ShmRing.attach(ring_name).slot_count == 2
    ring.close()
    assert not (SHM / ring_name).exists()
    ring.close()  # idempotent


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="the resource-tracker bug is fixed by track=False in 3.13")
def test_the_python_bug_is_real_so_the_test_above_means_something(ring_name):
    raw_attach = """
        import sys
        from multiprocessing.shared_memory import SharedMemory
        SharedMemory(sys.argv[1]).close()
    """
    ring = ShmRing.create(ring_name, slot_count=1, slot_shape=(16,), dtype="uint8")
    run_python(raw_attach, ring_name)
    assert not (SHM / ring_name).exists()  # the plain attacher's resource tracker deleted it
    ring.close()  # and the owner's unlink then finds nothing
    assert not (SHM / ring_name).exists()


def test_spawned_children_sharing_the_creators_resource_tracker_leave_no_warnings(ring_name, tmp_path):
    # A supervisor's children share one resource tracker: attaching and closing there must not disturb it.
    script = tmp_path / "supervisor.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing, sys
            from lineguard.agent.ring import ShmRing

            def attach_and_close(name):
                ShmRing.attach(name).close()

            if __name__ == "__main__":
                context = multiprocessing.get_context("spawn")
                with ShmRing.create(sys.argv[1], slot_count=2, slot_shape=(8,), dtype="uint8"):
                    for target in (attach_and_close, ShmRing.attach):  # closed explicitly, then at exit
                        child = context.Process(target=target, args=(sys.argv[1],))
                        child.start()
                        child.join()
                        assert child.exitcode == 0
                    ShmRing.attach(sys.argv[1]).close()
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script), ring_name], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr, result.stderr
    assert not (SHM / ring_name).exists()


def test_create_replaces_the_segment_left_by_a_killed_creator(ring_name):
    result = run_python(
        """
        import os, signal, sys
        from lineguard.agent.ring import ShmRing
        ShmRing.create(sys.argv[1], slot_count=2, slot_shape=(100,), dtype="uint8")
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        ring_name,
    )
    assert result.returncode == -9
    assert (SHM / ring_name).exists()  # nothing cleaned up after the crash
    with ShmRing.create(ring_name, slot_count=5, slot_shape=(3, 4), dtype="float32"):
        attached = ShmRing.attach(ring_name)
        assert (attached.slot_count, attached.slot_shape, attached.dtype) == (5, (3, 4), np.float32)
        attached.close()


def test_a_reader_learns_that_its_ring_was_replaced_by_a_new_run(ring_name):
    first = ShmRing.create(ring_name, slot_count=1, slot_shape=(4,), dtype="uint8")
    reader = ShmRing.attach(ring_name)
    assert not reader.replaced() and not first.replaced()
    first.close()
    assert reader.replaced()  # unlinked
    with ShmRing.create(ring_name, slot_count=1, slot_shape=(4,), dtype="uint8") as second:
        second.acquire(0, now_ns=0, reclaim_after_ns=1)
        second.publish(0, 0, t_capture_ns=0)
        assert reader.replaced()  # a newer segment of the same name
        with pytest.raises(StaleSlotError):
            reader.read(0, 0)  # the old mapping never sees the new run's frames
        reader.close()
        reader = ShmRing.attach(ring_name)
        assert not reader.replaced() and reader.read(0, 0).shape == (4,)
        reader.close()


def test_create_replaces_a_foreign_leftover_file(ring_name):
    (SHM / ring_name).write_bytes(b"not a ring")
    with ShmRing.create(ring_name, slot_count=2, slot_shape=(4,), dtype="uint8") as ring:
        assert ring.slot_count == 2


def test_a_view_kept_after_close_stays_readable_and_the_mapping_goes_with_it(ring_name):
    # In a child: if close() unmapped under a live view, reading it would be a segfault.
    result = run_python(
        """
        import os, sys
        from lineguard.agent.ring import ShmRing
        ring = ShmRing.create(sys.argv[1], slot_count=2, slot_shape=(1000,), dtype="uint8")
        slot = ring.acquire(1, now_ns=0, reclaim_after_ns=1)
        ring.array(slot)[:] = 3
        ring.publish(slot, 1, t_capture_ns=0)
        view, forgotten = ring.read(slot, 1), ShmRing.attach(sys.argv[1])  # never closed
        ring.close()
        maps = lambda: sum(sys.argv[1] in line for line in open("/proc/self/maps"))
        print(int(view.sum()), os.path.exists("/dev/shm/" + sys.argv[1]), maps())
        del view, forgotten
        print(maps())
        """,
        ring_name,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3000", "False", "2", "0"]
    assert result.stderr == ""


def test_views_are_built_once_and_addresses_point_at_them(ring_name):
    with ShmRing.create(ring_name, slot_count=3, slot_shape=(6, 10), dtype="uint8") as ring:
        assert ring.array(1) is ring.array(1)
        assert ring.address(1) == ring.array(1).ctypes.data
        assert ring.address(1) % 64 == 0 and ring.address(2) - ring.address(1) == 64
        ring.acquire(0, now_ns=0, reclaim_after_ns=1)
        ring.publish(0, 0, t_capture_ns=0)
        with pytest.raises(ValueError, match="read-only"):
            ring.read(0, 0)[0, 0] = 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slot_count": 0}, "slot_count must be an integer >= 1, got 0"),
        ({"slot_count": True}, "slot_count must be an integer"),
        ({"slot_shape": (0, 4)}, "slot_shape must be a tuple of 1-8 positive integers"),
        ({"slot_shape": [2, 4]}, "slot_shape must be a tuple"),
        ({"slot_shape": ()}, "slot_shape must be a tuple"),
        ({"dtype": "object"}, "plain numeric dtype"),
        ({"dtype": "u1,f4"}, "plain numeric dtype"),
        ({"dtype": "nonsense"}, "is not a numpy dtype"),
        ({"slot_shape": (1 << 24, 1 << 24)}, "free; use fewer slots"),
    ],
)
def test_create_refuses_bad_arguments_with_a_clear_message(ring_name, kwargs, message):
    arguments = {"slot_count": 2, "slot_shape": (4, 4), "dtype": "uint8", **kwargs}
    with pytest.raises(RingError, match=message):
        ShmRing.create(ring_name, **arguments)
    assert not (SHM / ring_name).exists()


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201, "sp ace", "..", ".hidden"])
def test_ring_names_that_cannot_name_a_segment_are_refused(name):
    with pytest.raises(RingError, match="ring name"):
        ShmRing.create(name, slot_count=1, slot_shape=(1,), dtype="uint8")
    with pytest.raises(RingError, match="ring name"):
        ShmRing.attach(name)


def test_attach_refuses_a_missing_a_foreign_and_a_newer_segment(ring_name):
    with pytest.raises(RingError, match=r"does not exist.*capture"):
        ShmRing.attach(ring_name)
    (SHM / ring_name).write_bytes(b"x" * 10)
    with pytest.raises(RingError, match="too small"):
        ShmRing.attach(ring_name)
    (SHM / ring_name).write_bytes(b"x" * 4096)
    with pytest.raises(RingError, match="not a Lineguard ring"):
        ShmRing.attach(ring_name)
    with ShmRing.create(ring_name, slot_count=1, slot_shape=(4,), dtype="uint8"):
        with (SHM / ring_name).open("r+b") as segment:
            segment.seek(8)
            segment.write((2).to_bytes(8, sys.byteorder))
        with pytest.raises(RingError, match="layout version 2, this agent reads 1"):
            ShmRing.attach(ring_name)


def test_bad_slot_indexes_and_seqs_and_use_after_close_raise_ring_error(ring_name):
    ring = ShmRing.create(ring_name, slot_count=2, slot_shape=(4,), dtype="uint8")
    for call in (lambda: ring.array(2), lambda: ring.address(-1), lambda: ring.read(5, 0), lambda: ring.release(2, 0)):
        with pytest.raises(RingError, match=r"slot -?\d+ out of range 0\.\.1"):
            call()
    with pytest.raises(RingError, match="seq must be >= 0"):
        ring.acquire(-1, now_ns=0, reclaim_after_ns=1)
    with pytest.raises(StaleSlotError, match="FREE"):
        ring.publish(0, 0, t_capture_ns=0)
    ring.close()
    with pytest.raises(RingError, match="is closed"):
        ring.acquire(0, now_ns=0, reclaim_after_ns=1)


def test_a_name_in_dev_shm_that_cannot_be_removed_is_a_named_refusal_not_a_crash_loop(ring_name):
    from lineguard.agent.ring import RingRefused

    # As root nothing in /dev/shm resists unlink; a folder of that name does, the way another user's file
    # resists the agent's user (sticky /dev/shm).
    (SHM / ring_name).mkdir()
    (SHM / ring_name / "x").write_bytes(b"")
    try:
        with pytest.raises(
            RingRefused, match=r"cannot be removed.*Remove it as root, or run the agent under its systemd unit"
        ):
            ShmRing.create(ring_name, slot_count=2, slot_shape=(4,), dtype="uint8")
    finally:
        (SHM / ring_name / "x").unlink()
        (SHM / ring_name).rmdir()
