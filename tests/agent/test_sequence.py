"""capture/sequence.py: sequence numbers never repeat, across clean stops, killed processes and power cuts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lineguard.agent.capture.sequence import SEQ_BLOCK, SequenceCounter, SequenceError


def take(counter: SequenceCounter, n: int) -> list[int]:
    return [counter.take() for _ in range(n)]


def test_a_fresh_counter_counts_from_one_and_reserves_ahead_on_disk(tmp_path):
    counter = SequenceCounter(tmp_path, "cam0")
    assert take(counter, 5) == [1, 2, 3, 4, 5]
    assert int((tmp_path / "cam0.seq").read_text()) > 5  # what a power cut restarts from
    assert not list(tmp_path.glob(".*.tmp"))  # written by rename: never half a number


def test_the_reservation_is_renewed_before_its_numbers_are_used(tmp_path):
    counter = SequenceCounter(tmp_path, "cam0")
    for seq in take(counter, 3 * SEQ_BLOCK):
        assert int((tmp_path / "cam0.seq").read_text()) > seq


def test_a_clean_stop_continues_at_exactly_the_next_number(tmp_path):
    counter = SequenceCounter(tmp_path, "cam0")
    take(counter, 7)
    counter.close()
    assert SequenceCounter(tmp_path, "cam0").take() == 8


KILLED = """
import os, sys
from pathlib import Path
from lineguard.agent.capture.sequence import SequenceCounter
counter = SequenceCounter(Path(sys.argv[1]), "cam0")
for _ in range(int(sys.argv[2])):
    counter.take()
print("taken", flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_killed_capture_is_followed_by_the_very_next_number(tmp_path):
    done = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), "300"], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL and done.stdout.strip() == "taken"
    assert SequenceCounter(tmp_path, "cam0").take() == 301  # no gap: no phantom frames for decision to fail


def test_after_a_power_cut_numbering_resumes_past_the_reservation_never_below(tmp_path):
    counter = SequenceCounter(tmp_path, "cam0")
    sent = take(counter, 40)
    # A power cut loses the page cache: the in-memory `last` record may be gone or stale; the reservation is on disk.
    (tmp_path / "cam0.last").write_bytes(b"\0" * 8)
    restarted = SequenceCounter(tmp_path, "cam0").take()
    assert sent[-1] < restarted <= sent[-1] + SEQ_BLOCK + 1


@pytest.mark.parametrize("content", ["", "abc", "0", "-5"])
def test_a_corrupt_reservation_is_an_error_that_says_how_to_recover_not_a_restart_at_one(tmp_path, content):
    (tmp_path / "cam0.seq").write_text(content)
    with pytest.raises(SequenceError, match=r"is corrupt.*Write a number above the last seq"):
        SequenceCounter(tmp_path, "cam0")


def test_a_full_disk_is_survived_until_the_reserved_numbers_run_out(tmp_path, monkeypatch):
    counter = SequenceCounter(tmp_path, "cam0")
    import lineguard.agent.capture.sequence as sequence

    def no_space(path: object, value: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sequence, "_write_durably", no_space)
    numbers = [counter.take() for _ in range(counter.left)]
    assert numbers == list(range(1, len(numbers) + 1))
    with pytest.raises(SequenceError, match="free disk space"):
        counter.take()
    assert os.path.exists(tmp_path / "cam0.seq")
