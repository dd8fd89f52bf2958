"""How a bundle travels from an operator to an agent over MQTT: checksummed chunks, resumable, QoS 1.

Topics (agent/contract/topics.py), with T = `<prefix>/<agent_id>/model/push/<transfer_id>`, all QoS 1, never retained:

    T/meta           operator -> agent  TransferMeta: sizes, sha256 of the archive and of every chunk, model,
                                        push_id, and the operator's signed push command
    T/chunk/<index>  operator -> agent  raw bytes archive[index * chunk_bytes : (index + 1) * chunk_bytes]
    T/ack            agent -> operator  TransferAck: the answer to every meta and chunk, then the verdict
    <prefix>/<agent_id>/model/events    ModelEvent: final verdicts only, for everyone

Ack states: "receiving" (an answer to meta carries `missing`, [start, stop) ranges of chunk indices still
needed; an answer to a chunk carries `chunk`, plus `refused` with the reason when it was discarded), "verifying"
(every chunk is in; sha256, unpack and the install run), then "received" or "failed" with `reason`.

Resume: the transfer id is the first 16 hex digits of the archive's sha256 and the archive is packed
deterministically, so pushing the same bundle again continues the same transfer. Publishing meta again is how a
sender asks what is missing: the sender does so at start, after a reconnect, and after `ask_interval_s` without
an answer, then sends only the chunks the agent lacks. The receiver keeps the archive and its chunk map on disk
(staging/<transfer_id>/archive.tar, transfer.json), so a restarted receiver resumes too. A transfer that hears
nothing for `rollout.transfer_timeout_s` is failed ("abandoned") and its staging folder removed; a finished one keeps only
transfer.json for that long, so a sender that missed the verdict gets it again (same push_id), while a new push
of the same bundle (new push_id) installs it again.
"""

from __future__ import annotations

CHUNK_BYTES = 256 * 1024
MAX_ARCHIVE_BYTES = 2 * 2**30  # receiver's default cap on one archive
MAX_MEMBERS = 1000  # receiver's default cap on files and folders in one archive
WINDOW_CHUNKS = 8  # chunks sent and not yet acknowledged by the agent (end-to-end flow control)
MAX_REFUSALS = 3  # the agent refusing one chunk this often fails the push: the sender's data is bad
INBOX_MAX_BYTES = 64 * 2**20  # receiver drops messages past this backlog; the sender's next ask recovers them


class TransferError(Exception):
    """A push failed: the agent refused it (`reason` holds its words), or it did not answer in time."""

    def __init__(self, message: str, *, reason: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.timed_out = timed_out


class ArchiveError(Exception):
    """A bundle archive cannot be packed or is unsafe to unpack (links, devices, paths outside, too big)."""


def expand(ranges: tuple[tuple[int, int], ...], count: int) -> set[int]:
    """The indices in 0..count-1 covered by half-open [start, stop) ranges.

    Linear in count and the number of ranges, however much they overlap (a peer's ranges are not trusted)."""
    covered = bytearray(count)
    for start, stop in ranges:
        start, stop = max(start, 0), min(stop, count)
        if start < stop:
            covered[start:stop] = b"\x01" * (stop - start)
    return {index for index, flag in enumerate(covered) if flag}


def as_ranges(indices: set[int]) -> tuple[tuple[int, int], ...]:
    """Sorted half-open [start, stop) ranges covering `indices`."""
    out: list[list[int]] = []
    for index in sorted(indices):
        if out and out[-1][1] == index:
            out[-1][1] = index + 1
        else:
            out.append([index, index + 1])
    return tuple((start, stop) for start, stop in out)
