"""Which frames the engine scores next: a micro-batch of one model's frames, oldest first, late ones shed.

Cameras may be scored by different models (cameras[].model). A batch holds frames of one model only; the
model whose oldest waiting frame is oldest goes first (every frame has the same deadline after capture, so
that is the earliest deadline), and the batch fills with that model's next frames, from any of its cameras.
Frames of other models keep their order for the next batch. Pure: no sockets, no clocks of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..messages import FrameReady


@dataclass(slots=True)
class Batch:
    """The next micro-batch: its model slot, its frames (capture order), and the frames shed as too late."""

    slot: str = ""
    frames: list[FrameReady] = field(default_factory=list)
    late: list[tuple[FrameReady, int]] = field(default_factory=list)  # (frame, age in ns)


def take_batch(
    backlog: deque[FrameReady],
    slot_of: Mapping[str, str],
    *,
    max_batch: int,
    now_ns: int,
    deadline_ns: int,
    expected_batch_ns: Mapping[str, int],
) -> Batch:
    """Remove the next batch (and every late frame met on the way) from `backlog`; the rest stays in order.

    slot_of: camera -> model slot. A frame is late when its age plus its model's expected batch time
    (expected_batch_ns, 0 if unknown) passes the deadline: scoring it would only make the next frame late too.
    """
    batch = Batch()
    kept: deque[FrameReady] = deque()
    while backlog and len(batch.frames) < max_batch:
        ready = backlog.popleft()
        slot = slot_of[ready.camera]
        age_ns = now_ns - ready.t_capture_ns
        if age_ns + expected_batch_ns.get(slot, 0) > deadline_ns:
            batch.late.append((ready, age_ns))
        elif not batch.frames or slot == batch.slot:
            batch.slot = slot
            batch.frames.append(ready)
        else:
            kept.append(ready)
    backlog.extendleft(reversed(kept))
    return batch
