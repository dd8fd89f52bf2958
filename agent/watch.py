"""`lineguard-agent watch`: follow an agent's verdicts on the broker, one line each, then a summary.

For line engineers at the broker's side: what is the agent deciding, how fast, and why.
"""

from __future__ import annotations

import sys
import threading
import uuid
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from .config import AgentConfig
from .contract import ContractError, Topics, Verdict, decode
from .mqtt import Subscription


@dataclass
class WatchSummary:
    """Counts and capture-to-publish latencies of the verdicts seen."""

    counts: dict[str, int] = field(default_factory=lambda: {"accept": 0, "reject": 0, "failsafe": 0})
    latencies_ms: list[float] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    malformed: int = 0

    def add(self, verdict: Verdict) -> None:
        self.counts[verdict.verdict] += 1
        self.seqs.add(verdict.seq)
        if verdict.verdict != "failsafe":
            self.latencies_ms.append(verdict.latency_ms.total)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def text(self) -> str:
        missing = (max(self.seqs) - min(self.seqs) + 1 - len(self.seqs)) if self.seqs else 0
        p50, p99 = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else (float("nan"),) * 2
        bad = f"; {self.malformed} malformed messages ignored" if self.malformed else ""
        return (
            f"{self.total} frames: {self.counts['accept']} accepted, {self.counts['reject']} rejected, "
            f"{self.counts['failsafe']} failsafe; {missing} sequence gaps; "
            f"capture-to-publish latency p50 {p50:.1f} ms, p99 {p99:.1f} ms{bad}"
        )


def _line(verdict: Verdict) -> str:
    score = "—" if verdict.score is None else f"{verdict.score:.2f}"
    why = f"[{verdict.cause}] {verdict.reason}" if verdict.cause else verdict.reason
    return (
        f"{verdict.camera:>8} seq {verdict.seq:>6}  {verdict.verdict.upper():<8} score {score:>7} "
        f"/ {verdict.threshold:.2f}  {verdict.latency_ms.total:6.1f} ms  {why}"
    )


def watch(config: AgentConfig, *, count: int, timeout_s: float, out: TextIO = sys.stdout) -> WatchSummary:
    """Print verdicts of every camera of this agent until `count` arrived or `timeout_s` passed."""
    summary = WatchSummary()
    done = threading.Event()
    lock = threading.Lock()
    topics = Topics(config.mqtt.topic_prefix)

    def on_message(topic: str, payload: bytes, properties: object) -> None:
        try:
            verdict = decode(Verdict, payload)
        except ContractError as error:
            with lock:
                summary.malformed += 1
            print(f"ignored a malformed verdict on {topic}: {error}", file=sys.stderr)
            return
        with lock:
            summary.add(verdict)
            print(_line(verdict), file=out, flush=True)
            if summary.total >= count:
                done.set()

    with Subscription(
        config.mqtt,
        f"lineguard-watch-{uuid.uuid4().hex[:8]}",
        [topics.verdict(config.line, config.agent_id, camera.name) for camera in config.cameras],
        on_message,
    ):
        done.wait(timeout_s)
    print(summary.text(), file=out, flush=True)
    return summary
