"""The pure half of a fleet rollout: which agents (selector), in which waves, and when to stop (abort rules).

Selector: comma-separated terms, an agent matches if any term matches it:
    line=L        agents whose status says line L (a glob: line=press-*)
    ID or GLOB    an agent id, or a glob on agent ids (press-?, *)
Waves: comma-separated cumulative sizes, each a count (1) or a share of the selected agents (25%, rounded up);
    "1,25%,100%" = the canary alone, then up to a quarter of the fleet, then all. Sizes must grow and the last
    must be 100%; a wave that would add nobody is skipped.
Abort rules: comma-separated `METRIC>LIMIT` terms, METRIC `failsafe` or `reject` (shares of an agent's verdicts
    with the new model during the soak), LIMIT `N%` (absolute) or `+Npp` (percentage points above the same
    agent's rate with its previous model). "failsafe>2%,reject>+5pp". Rules judge an agent only once it has
    sent --min-frames verdicts with the new model. A reject rule also judges the push's shadow prediction.
Every error is a PlanError that names the bad term.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from lineguard.deploy.fleet import Rates


class PlanError(ValueError):
    """A selector, wave list or abort rule that cannot be used; the message names the bad term."""


# -- selector -----------------------------------------------------------------------------------------------------

_NAME_GLOB = re.compile(r"^[A-Za-z0-9_\-*?\[\]!]{1,64}$")


def select(selector: str, lines: Mapping[str, str]) -> list[str]:
    """The agents (ids of `lines`: agent id -> its line) that `selector` names, sorted; PlanError if none."""
    terms = [term.strip() for term in selector.split(",")]
    chosen: set[str] = set()
    for term in terms:
        key, _, value = term.rpartition("=")
        if key not in ("", "line") or not _NAME_GLOB.fullmatch(value):
            msg = (
                f"selector term {term!r}: use line=LINE, an agent id or a glob on agent ids "
                "(letters, digits, '_', '-', '*', '?', '[]')"
            )
            raise PlanError(msg)
        if key == "line":
            chosen |= {agent for agent, line in lines.items() if fnmatchcase(line, value)}
        else:
            chosen |= {agent for agent in lines if fnmatchcase(agent, value)}
    if not chosen:
        known = ", ".join(sorted(lines)[:20]) or "none"
        msg = f"selector {selector!r} matches no agent with a retained status on the broker (agents seen: {known})"
        raise PlanError(msg)
    return sorted(chosen)


# -- waves --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaveSize:
    """A cumulative wave size: `count` agents, or `percent` of the selected ones (rounded up)."""

    count: int = 0
    percent: float = 0.0

    def of(self, total: int) -> int:
        return min(total, self.count if self.percent == 0 else math.ceil(total * self.percent / 100 - 1e-9))


def parse_waves(text: str) -> tuple[WaveSize, ...]:
    """`1,25%,100%` -> WaveSizes; PlanError naming the bad term."""
    sizes: list[WaveSize] = []
    for term in (each.strip() for each in text.split(",")):
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)%|([0-9]+)", term)
        if match is None:
            msg = f"wave {term!r}: use a number of agents (1) or a share of them (25%)"
            raise PlanError(msg)
        if match.group(1):
            size, bad = WaveSize(percent=float(match.group(1))), not 0 < float(match.group(1)) <= 100
        else:
            size, bad = WaveSize(count=int(match.group(2))), int(match.group(2)) < 1
        if bad:
            msg = f"wave {term!r}: a count must be at least 1, a share in (0, 100]%"
            raise PlanError(msg)
        sizes.append(size)
    if sizes[-1].percent != 100:
        msg = f"wave {text.split(',')[-1].strip()!r}: the last wave must be 100% (every selected agent)"
        raise PlanError(msg)
    return tuple(sizes)


def plan_waves(agents: Sequence[str], sizes: Sequence[WaveSize], *, canary: str = "") -> list[list[str]]:
    """Split `agents` into waves of the cumulative `sizes`; `canary` (one of agents) goes first.

    Order is otherwise the agents' order (sorted ids), so the same fleet gives the same plan. Empty waves are
    dropped; every agent is in exactly one wave."""
    if canary and canary not in agents:
        msg = f"canary {canary!r} is not one of the selected agents ({', '.join(agents[:20])})"
        raise PlanError(msg)
    ordered = ([canary] if canary else []) + [agent for agent in agents if agent != canary]
    waves: list[list[str]] = []
    done = 0
    for size in sizes:
        upto = max(size.of(len(ordered)), done)
        if upto > done:
            waves.append(ordered[done:upto])
            done = upto
    return waves


# -- abort rules ----------------------------------------------------------------------------------------------------

Metric = Literal["failsafe", "reject"]


@dataclass(frozen=True, slots=True)
class AbortRule:
    """Stop when `metric` (a share, 0..1) passes `limit`, absolute or `relative` to the agent's previous model."""

    metric: Metric
    limit: float  # a share: 0.02 for 2% or +2pp
    relative: bool
    text: str

    def breach(self, soak: Rates, baseline: Rates | None) -> str:
        """Why the soak breaks this rule ("" when it does not; also when it has no frames yet)."""
        if soak.frames == 0:
            return ""
        rate = soak.failsafe_rate if self.metric == "failsafe" else soak.reject_rate
        if not self.relative:
            return (
                ""
                if rate <= self.limit
                else f"{self.metric} rate {100 * rate:.1f} % over {soak.frames} frames ({self.text})"
            )
        if baseline is None or baseline.frames == 0:
            return ""  # nothing to compare with: the agent sent no verdict with its previous model
        before = baseline.failsafe_rate if self.metric == "failsafe" else baseline.reject_rate
        if rate - before <= self.limit:
            return ""
        return (
            f"{self.metric} rate {100 * before:.1f} % -> {100 * rate:.1f} % ({100 * (rate - before):+.1f} points over "
            f"{soak.frames} frames; {self.text})"
        )


def parse_abort_rules(text: str) -> tuple[AbortRule, ...]:
    """`failsafe>2%,reject>+5pp` -> rules; "" -> none; PlanError naming the bad term."""
    rules: list[AbortRule] = []
    for term in (each.strip() for each in text.split(",") if each.strip()):
        match = re.fullmatch(r"(failsafe|reject)\s*>\s*(?:([0-9]+(?:\.[0-9]+)?)%|\+([0-9]+(?:\.[0-9]+)?)pp)", term)
        if match is None:
            msg = f"abort rule {term!r}: use failsafe>N% or reject>N% (absolute) or failsafe>+Npp or reject>+Npp"
            raise PlanError(msg)
        absolute, points = match.group(2), match.group(3)
        value = float(absolute if absolute is not None else points)
        if value > 100:
            msg = f"abort rule {term!r}: a limit above 100 can never be passed"
            raise PlanError(msg)
        rules.append(AbortRule(match.group(1), value / 100, absolute is None, term))  # type: ignore[arg-type]
    return tuple(rules)


def first_breach(rules: Iterable[AbortRule], soak: Rates, baseline: Rates | None, *, min_frames: int = 1) -> str:
    """The first rule the soak breaks, as a reason; "" when none, and while it has fewer than min_frames verdicts
    (a rate over a handful of frames is noise: one reject in one frame is 100 %)."""
    if soak.frames < min_frames:
        return ""
    for rule in rules:
        reason = rule.breach(soak, baseline)
        if reason:
            return reason
    return ""
