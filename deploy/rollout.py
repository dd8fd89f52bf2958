"""`lineguard-deploy rollout`: one bundle to many agents in waves, watched through a soak, halted and rolled back.

The plan (deploy/plan.py) comes from the agents' retained statuses; the first wave is the canary. Each agent
of a wave gets the signed push of `lineguard-deploy push` (deploy/commands.py): the agent's own canary and
shadow phase run before it answers. Then the wave soaks: every agent of it must keep answering (a status at
least every `silence_s`, online) and stay within the abort rules, judged on its verdicts with the new model
against its verdicts with the model it served before (deploy/fleet.py). When an agent refuses, stops
answering or breaks a rule, the rollout halts: the agents of that wave that took the bundle get signed
rollbacks to the model each served before, and later waves are skipped. Earlier waves, which passed their
soak, keep the new model. The state file (deploy/rollout_state.py) is rewritten after every step.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lineguard.agent.mqtt import MqttError
from lineguard.agent.rollout.archive import read_model_id
from lineguard.agent.rollout.wire import TransferError
from lineguard.deploy.commands import PushOutcome, PushRequest, push, rollback
from lineguard.deploy.config import DeployConfig
from lineguard.deploy.fleet import FleetWatch, Rates, format_table, previous_model, serving
from lineguard.deploy.plan import AbortRule, first_breach, parse_abort_rules, parse_waves, plan_waves, select
from lineguard.deploy.rollout_state import (
    AgentState,
    RolloutState,
    check_resumable,
    load_state,
    manifest_digest,
    save_state,
)

EXIT_DONE, EXIT_HALTED, EXIT_ROLLBACK_INCOMPLETE = 0, 2, 3
POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class RolloutOptions:
    """What the operator asked for (`lineguard-deploy rollout` flags)."""

    bundle: Path
    selector: str
    waves: str
    abort_if: str
    soak_s: float
    canary: str
    baseline_s: float  # listen this long before the first push: each agent's rates with its current model
    silence_s: float  # an agent without a status this long during its soak has stopped answering
    push_timeout_s: float
    state_path: Path
    wait_s: float  # collect retained statuses this long to see the fleet
    min_frames: int = 20  # abort rules judge an agent once it sent this many verdicts with the new model
    parallel: int = 8  # pushes of one wave in flight at once


Say = Callable[[str], None]


_SAYING = threading.Lock()


def _stderr(line: str) -> None:
    """One whole line to stderr: the pushes of a wave report from several threads."""
    with _SAYING:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_rollout(config: DeployConfig, key: Ed25519PrivateKey, options: RolloutOptions, say: Say = _stderr) -> int:
    """Plan (or resume) and drive the rollout; prints the final table on stdout; returns the exit code."""
    rules = parse_abort_rules(options.abort_if)
    sizes = parse_waves(options.waves)
    digest = manifest_digest(options.bundle)
    model_id, version = read_model_id(options.bundle)
    model = f"{model_id}@{version}"
    state = load_state(options.state_path)
    if state is not None:
        check_resumable(state, manifest_sha256=digest, path=options.state_path)
    if state is not None and state.phase == "running":
        say(
            f"resuming the rollout of {state.model} from {options.state_path}: wave {state.wave + 1} of {len(state.waves)}"
        )
        rules = parse_abort_rules(state.abort_if)
    else:
        with FleetWatch(config, verdicts=False) as seen:
            time.sleep(options.wait_s)
            views = seen.snapshot()
        online = {agent: view.status.line for agent, view in views.items() if view.status and view.status.online}
        offline = sorted(agent for agent, view in views.items() if view.status and not view.status.online)
        if offline:
            say(f"not in the plan, offline: {', '.join(offline)}")
        agents = select(options.selector, online)
        waves = plan_waves(agents, sizes, canary=options.canary)
        now = time.time()
        state = RolloutState(
            bundle=str(options.bundle.absolute()),
            manifest_sha256=digest,
            model=model,
            selector=options.selector,
            waves_spec=options.waves,
            abort_if=options.abort_if,
            soak_s=options.soak_s,
            waves=waves,
            agents={
                agent: AgentState(wave=index, previous=previous_model(views[agent].status, model_id))
                for index, wave in enumerate(waves)
                for agent in wave
            },
            started_ts=now,
            updated_ts=now,
        )
        save_state(options.state_path, state)
        say(
            f"rollout of {model} to {len(agents)} agents in {len(waves)} waves: "
            + " | ".join(", ".join(w) for w in waves)
        )
    driver = _Driver(config, key, options, state, rules, say)
    try:
        driver.run()
    finally:
        driver.close()
    print(format_table(("AGENT", "WAVE", "OUTCOME", "SERVING", "REASON"), driver.final_rows()))
    if state.phase == "done":
        return EXIT_DONE
    return EXIT_HALTED if state.phase == "halted" else EXIT_ROLLBACK_INCOMPLETE


class _Driver:
    """Runs the waves of one RolloutState; every change of the state is saved at once."""

    def __init__(
        self,
        config: DeployConfig,
        key: Ed25519PrivateKey,
        options: RolloutOptions,
        state: RolloutState,
        rules: tuple[AbortRule, ...],
        say: Say,
    ) -> None:
        from tqdm import tqdm

        self.config, self.key, self.options, self.state, self.rules, self.say = config, key, options, state, rules, say
        self.watch = FleetWatch(config, state.agents)
        self.bar = tqdm(
            total=len(state.agents),
            initial=sum(each.outcome == "soaked" for each in state.agents.values()),
            unit="agent",
            desc=f"rollout {state.model}",
            disable=not sys.stderr.isatty(),
        )

    def close(self) -> None:
        self.bar.close()
        self.watch.close()

    def save(self) -> None:
        self.state.updated_ts = time.time()
        save_state(self.options.state_path, self.state)

    def run(self) -> None:
        time.sleep(self.options.baseline_s)  # verdicts with each agent's current model: the baseline
        state = self.state
        while state.phase == "running" and state.wave < len(state.waves):
            self.bar.set_postfix_str(f"wave {state.wave + 1}/{len(state.waves)}")
            halt = self.push_wave() or self.soak_wave()
            if halt:
                self.halt(halt)
                return
            for agent in state.waves[state.wave]:
                state.agents[agent].outcome = "soaked"
            self.bar.update(len(state.waves[state.wave]))
            self.say(
                f"wave {state.wave + 1} of {len(state.waves)} passed its soak: {', '.join(state.waves[state.wave])}"
            )
            if state.wave + 1 < len(state.waves):
                state.wave += 1
            else:
                state.phase = "done"
            self.save()

    def push_wave(self) -> str:
        """Push to the wave's pending agents, `options.parallel` at a time; the reason to halt, "" when all took it.

        Pushes run in worker threads and only send and wait; their outcomes are recorded (and the state file
        written) here, one at a time. After the first reason to halt no further push starts, and the ones in
        flight are waited for, so every agent that may have taken the bundle is rolled back with its wave.
        """
        to_push = []
        for agent in self.state.waves[self.state.wave]:
            each = self.state.agents[agent]
            if each.outcome != "pending":
                continue  # resumed: it took the bundle before the operator's machine stopped
            view = self.watch.view(agent)
            if view.status is not None and view.status.model == self.state.model:
                each.outcome, each.serving, each.reason = "accepted", self.state.model, "already serving it"
                self.save()
                continue
            to_push.append(agent)
        halt, lost_broker = "", None
        with ThreadPoolExecutor(max_workers=max(1, self.options.parallel), thread_name_prefix="push") as pool:
            running = {pool.submit(self.push_one, agent): agent for agent in to_push}
            for done in as_completed(running):
                agent = running[done]
                try:
                    outcome = done.result()
                except (OSError, MqttError) as error:  # no broker: that agent stays pending, the rollout stops
                    lost_broker, reason = lost_broker or error, f"{agent}: push not sent: {error}"
                else:
                    reason = self.record_push(agent, outcome)
                    self.save()
                if reason and not halt:
                    halt = reason
                    for waiting in running:
                        waiting.cancel()  # not started yet: stays pending, skipped by the halt
        if lost_broker is not None:
            raise lost_broker  # as a single push's failure does; every answer that came is in the state file
        return halt

    def push_one(self, agent: str) -> PushOutcome | TransferError:
        """One push, in a worker thread: the agent's answer, or the TransferError that says why there is none."""
        self.say(f"wave {self.state.wave + 1}: pushing {self.state.model} to {agent}")
        request = PushRequest(Path(self.state.bundle), agent, self.options.push_timeout_s)
        try:
            return push(self.config, self.key, request)
        except TransferError as error:
            return error

    def record_push(self, agent: str, outcome: PushOutcome | TransferError) -> str:
        """What a push did to `agent`'s state; the reason to halt, "" when it took the bundle within the rules."""
        each = self.state.agents[agent]
        if isinstance(outcome, TransferError):
            error = outcome
            if error.timed_out:  # it may have swapped without our hearing it: roll it back with its wave
                each.outcome, each.reason = "accepted", f"no answer to the push: {error}"
                return f"{agent} did not answer the push within {self.options.push_timeout_s:g} s"
            each.outcome, each.reason, each.serving = "refused", error.reason, each.previous
            return f"{agent} refused {self.state.model}: {error.reason}"
        each.outcome, each.serving, each.reason = "accepted", self.state.model, outcome.result.reason
        self.say(f"{agent}: {outcome.result.reason}")
        shadow = outcome.event.shadow if outcome.event is not None else None
        if shadow is not None:
            predicted = Rates(shadow.frames, round(shadow.candidate_reject_rate * shadow.frames), 0)
            before = Rates(shadow.frames, round(shadow.serving_reject_rate * shadow.frames), 0)
            rules = (rule for rule in self.rules if rule.metric == "reject")
            breach = first_breach(rules, predicted, before, min_frames=self.options.min_frames)
            if breach:
                each.reason = f"shadow: {breach}"
                return f"{agent}: shadow scoring predicts {breach}"
        return ""

    def soak_wave(self) -> str:
        """Watch the wave's agents for soak_s; the reason to halt, "" when every one of them stayed well."""
        wave = self.state.waves[self.state.wave]
        self.say(f"wave {self.state.wave + 1}: soaking {', '.join(wave)} for {self.state.soak_s:g} s")
        deadline = time.monotonic() + self.state.soak_s
        while True:
            for agent in wave:
                problem = self.judge(agent)
                if problem:
                    self.state.agents[agent].reason = problem
                    return f"{agent}: {problem}"
            if time.monotonic() >= deadline:
                return ""
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def judge(self, agent: str) -> str:
        """Why `agent` fails its soak now ("" when it does not)."""
        view, each = self.watch.view(agent), self.state.agents[agent]
        silent_s = time.monotonic() - view.status_heard
        if view.status is None or silent_s > self.options.silence_s:
            return f"stopped answering: no status for {min(silent_s, 1e6):.0f} s"
        if not view.status.online:
            return f"went offline: {view.status.reason or 'its last will'}"
        baseline = view.rates(each.previous) if each.previous else None
        return first_breach(self.rules, view.rates(self.state.model), baseline, min_frames=self.options.min_frames)

    def halt(self, reason: str) -> None:
        """Roll back the wave's agents that took the bundle; skip everything not pushed yet."""
        state = self.state
        self.say(f"halting the rollout in wave {state.wave + 1}: {reason}")
        incomplete = []
        for agent in state.waves[state.wave]:
            each = state.agents[agent]
            if each.outcome == "accepted":
                self.roll_back(agent, each)
                incomplete += [agent] if each.outcome == "rollback-failed" else []
        for each in state.agents.values():
            if each.outcome == "pending":
                each.outcome, each.reason = "skipped", "the rollout halted"
        state.phase = "halted-rollback-incomplete" if incomplete else "halted"
        self.save()
        if incomplete:
            self.say(f"rollback incomplete: {', '.join(incomplete)} may still serve {state.model}")

    def roll_back(self, agent: str, each: AgentState) -> None:
        self.say(f"rolling back {agent} to {each.previous or 'its previous model'}")
        try:
            answer = rollback(self.config, self.key, agent, to=each.previous, timeout_s=self.options.push_timeout_s)
        except (OSError, MqttError) as error:
            each.outcome, each.reason = "rollback-failed", f"rollback not sent: {error}"
        else:
            if answer is None:
                each.outcome = "rollback-failed"
                each.reason = f"no answer to the rollback within {self.options.push_timeout_s:g} s; {each.reason}"
            elif answer.outcome != "accepted":
                each.outcome, each.reason = "rollback-failed", f"rollback refused: {answer.reason}; {each.reason}"
            else:
                each.outcome, each.serving = "rolled-back", answer.serving
        self.save()

    def final_rows(self) -> list[tuple[str, ...]]:
        views = self.watch.snapshot()
        rows: list[tuple[str, ...]] = []
        for agent, each in sorted(self.state.agents.items(), key=lambda item: (item[1].wave, item[0])):
            live = serving(views[agent]) if agent in views else "—"
            shown = each.serving if each.outcome in ("accepted", "soaked", "rolled-back") and each.serving else live
            rows.append((agent, str(each.wave + 1), each.outcome, shown, each.reason[:120]))
        return rows
