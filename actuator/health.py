"""Is the vision system fit to decide parts? Pure logic over what the service tells it, with the time passed in.

A vision fault is any of: the broker connection is down; a source agent is offline (its last will or a
clean stop said so) or silent for fault.agent_silent_s; an alarm was raised (an unguarded part, a pulse
that could not fire) less than fault.hold_s ago. An output fault (device unreachable, PLC not echoing) is
reported as such. While any fault stands, the configured fault action applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["ok", "vision-fault", "output-fault"]


@dataclass(slots=True)
class Health:
    agents: tuple[str, ...]
    agent_silent_s: float
    hold_s: float
    broker_up: bool = False
    _online: dict[str, bool] = field(default_factory=dict)
    _heard: dict[str, float] = field(default_factory=dict)  # agent -> monotonic time of its last status
    _alarm: str = ""
    _alarm_until: float = float("-inf")

    def agent_status(self, agent: str, *, online: bool, now: float) -> None:
        self._online[agent], self._heard[agent] = online, now

    def alarm(self, why: str, now: float) -> None:
        """Hold the fault for hold_s from now: something went by unguarded."""
        self._alarm, self._alarm_until = why, now + self.hold_s

    def online(self, now: float) -> dict[str, bool]:
        return {agent: self._agent_ok(agent, now) for agent in self.agents}

    def _agent_ok(self, agent: str, now: float) -> bool:
        return self._online.get(agent, False) and now - self._heard.get(agent, float("-inf")) <= self.agent_silent_s

    def vision_fault(self, now: float) -> str:
        """Why the vision system cannot be trusted now; "" when it can."""
        if not self.broker_up:
            return "broker connection lost"
        down = [agent for agent in self.agents if not self._agent_ok(agent, now)]
        if down:
            return f"agent {', '.join(down)} offline or silent"
        if now < self._alarm_until:
            return self._alarm
        return ""

    def state(self, now: float, output_problem: str) -> tuple[State, str]:
        vision = self.vision_fault(now)
        if vision:
            return "vision-fault", vision
        if output_problem:
            return "output-fault", output_problem
        return "ok", ""
