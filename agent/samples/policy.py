"""Which verdicts become samples: every reject and failsafe, close calls, and a pseudo-random share of accepts.

Pure functions of the verdict, so the engine (which copies anomaly maps out only for frames decision will read)
and decision (which keeps the samples) agree on every frame without talking about it.

- reject, failsafe: always (failsafe with its cause; most failsafe frames have no score and no usable pixels).
- close-call: an accept whose score lies within `close_call_margin` of the way from the calibration's median
  good score up to the threshold. The bundle's score normalisation puts the median good score at 0 and the
  threshold at 0.5 (`scale` = 2 x that distance), so the band means the same for every model kind.
- random: 1 in `random_one_in` of the remaining accepts, chosen by a hash of (agent, camera, seq) rather than
  by counting: a rotary table with N stations cannot alias with it, and the engine can tell which frames are
  picked without decision telling it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import SamplesConfig
from ..contract import SampleKind

_HASH_SPAN = float(2**64)


@dataclass(frozen=True, slots=True)
class SamplePolicy:
    """Which verdicts of one agent are kept.

    close_call_margin: share of the median-good-to-threshold distance below the threshold, in [0, 1].
    random_one_in: keep 1 in N of the other accepts; 0 keeps none. salt: the agent id.
    """

    close_call_margin: float
    random_one_in: int
    salt: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.close_call_margin <= 1.0 or self.random_one_in < 0:
            msg = f"close_call_margin must be in [0, 1] and random_one_in >= 0, got {self.close_call_margin}, {self.random_one_in}"
            raise ValueError(msg)

    @classmethod
    def of(cls, config: SamplesConfig, agent_id: str) -> SamplePolicy:
        return cls(config.close_call_margin, config.random_one_in, agent_id)

    def kind(
        self, verdict: str, score: float | None, *, threshold: float, scale: float, camera: str, seq: int
    ) -> SampleKind | None:
        """Why this verdict is kept as a sample, or None. scale: the bundle's score_normalisation.scale (> 0)."""
        if verdict == "reject":
            return "reject"
        if verdict == "failsafe":
            return "failsafe"
        if score is None:
            return None
        if score >= self.close_call_floor(threshold, scale):
            return "close-call"
        if self.is_random_pick(camera, seq):
            return "random"
        return None

    def close_call_floor(self, threshold: float, scale: float) -> float:
        """The lowest score of a close call: threshold - margin x (threshold - median good score)."""
        if self.close_call_margin == 0.0:
            return threshold  # only rejects reach it: no close calls
        return threshold - self.close_call_margin * scale / 2.0

    def is_random_pick(self, camera: str, seq: int) -> bool:
        """True for a pseudo-random 1 in random_one_in frames of a camera; the same answer in every process."""
        if self.random_one_in == 0:
            return False
        digest = hashlib.blake2b(f"{self.salt}/{camera}/{seq}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / _HASH_SPAN < 1.0 / self.random_one_in

    def map_rows(
        self, scores: np.ndarray, frames: Sequence[tuple[str, int]], *, threshold: float, scale: float
    ) -> list[int]:
        """Rows of a scored batch whose anomaly map a sample will keep (rejects, close calls, random picks).

        scores: (N,) float32; frames: (camera, seq) of each row. Failsafe frames have no map to keep.
        """
        floor = self.close_call_floor(threshold, scale)
        return [
            row
            for row, (score, (camera, seq)) in enumerate(zip(np.asarray(scores).tolist(), frames, strict=True))
            if score >= floor or self.is_random_pick(camera, seq)
        ]
