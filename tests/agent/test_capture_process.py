"""capture/process.py's SequenceCounter: sequence numbers only grow, also across capture restarts."""

from __future__ import annotations

from lineguard.agent.capture.process import SEQ_BLOCK, SequenceCounter


def take(counter: SequenceCounter, n: int) -> list[int]:
    return [counter.take() for _ in range(n)]


def test_a_fresh_counter_counts_from_one_and_reserves_a_block_on_disk(tmp_path):
    path = tmp_path / "cam0.seq"
    counter = SequenceCounter(path)
    assert take(counter, 5) == [1, 2, 3, 4, 5]
    assert path.read_text() == str(1 + SEQ_BLOCK)  # what a restart starts from
    assert not path.with_suffix(".tmp").exists()  # written by rename: never half a number


def test_crossing_a_block_reserves_the_next_one_before_its_numbers_are_used(tmp_path):
    path = tmp_path / "cam0.seq"
    counter = SequenceCounter(path)
    numbers = take(counter, SEQ_BLOCK + 3)
    assert numbers == list(range(1, SEQ_BLOCK + 4))
    assert int(path.read_text()) == 1 + 2 * SEQ_BLOCK
    assert int(path.read_text()) > numbers[-1]


def test_a_restarted_capture_never_repeats_a_number_its_predecessor_may_have_sent(tmp_path):
    path = tmp_path / "cam0.seq"
    sent: list[int] = []
    for run_length in (3, SEQ_BLOCK - 1, SEQ_BLOCK, 1, 2 * SEQ_BLOCK + 7, 0, 5):
        sent += take(SequenceCounter(path), run_length)  # each run ends in a crash: nothing is saved at exit
    assert sent == sorted(sent)
    assert len(set(sent)) == len(sent)
    restarted = SequenceCounter(path).take()
    assert restarted > sent[-1]
    assert restarted - sent[-1] <= SEQ_BLOCK + 1  # the gap decision fails after a restart: at most about a block
