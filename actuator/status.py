"""What the actuator has done since start (Counts), and its retained ActuatorStatus record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lineguard.agent.contract import ActuatorStatus, RejectReason

from .config import ActuatorConfig
from .health import State


@dataclass(slots=True)
class Counts:
    parts: int = 0
    pulses: int = 0
    rejects: dict[RejectReason, int] = field(default_factory=dict)
    late_pulses: int = 0
    late_verdicts: int = 0
    unguarded: int = 0
    bad_input: int = 0
    handshake_failures: int = 0


def status_record(
    config: ActuatorConfig,
    counts: Counts,
    *,
    online: bool,
    state: State | str,
    reason: str,
    agents: dict[str, bool],
) -> ActuatorStatus:
    return ActuatorStatus(
        actuator_id=config.actuator_id,
        line=config.line,
        online=online,
        state=state,  # type: ignore[arg-type]
        mode=config.mode,
        reason=reason[:500],
        output=config.output.kind,
        agents=agents,
        parts=counts.parts,
        pulses=counts.pulses,
        rejects=dict(counts.rejects),
        late_pulses=counts.late_pulses,
        late_verdicts=counts.late_verdicts,
        unguarded=counts.unguarded,
        bad_input=counts.bad_input,
        handshake_failures=counts.handshake_failures,
        ts=time.time(),
    )
