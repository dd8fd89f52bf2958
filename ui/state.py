"""What the broker said, in memory: per camera the latest frame, recent verdicts, rates and latencies; per agent
its status and serving model; actuators. Thread-safe; fed by the MQTT thread, read by the web server and the
alarm ticker. Everything here is bounded: old verdicts, buckets and unpaired heatmaps fall off the end.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from lineguard.agent.contract import ActuatorStatus, AgentStatus, HeatmapInfo, Latency, ModelEvent, Verdict

from .alarms import AgentFacts, CameraFacts, Facts
from .config import AlarmConfig

RECENT_VERDICTS = 60  # per camera, for the verdict stream of a freshly opened page
LATENCY_WINDOW = 500  # verdicts per camera behind the latency percentiles
BUCKET_S = 10  # chart resolution, seconds
BUCKETS = 60  # chart length: 10 minutes
QUEUE_HISTORY = 10  # mqtt_queued of an agent's last statuses
RECENT_KEYS = 512  # verdicts per camera remembered to pair a late heatmap or sample with
RECENT_IMAGES = 256  # gallery images held in memory (the newest; older ones come from the store)
STAGES = tuple(Latency.model_fields)


@dataclass(frozen=True, slots=True)
class Frame:
    """The latest image an agent published for a camera (a heatmap overlay), with the verdict it belongs to."""

    info: HeatmapInfo
    image: bytes
    received_ts: float
    verdict: Verdict | None


@dataclass
class Buckets:
    """Verdict counts per BUCKET_S seconds over the last BUCKETS buckets, by kind."""

    start: deque[int] = field(default_factory=lambda: deque(maxlen=BUCKETS))
    counts: deque[list[int]] = field(default_factory=lambda: deque(maxlen=BUCKETS))

    def add(self, now: float, kind_index: int) -> None:
        bucket = int(now // BUCKET_S) * BUCKET_S
        if not self.start or self.start[-1] != bucket:
            self.start.append(bucket)
            self.counts.append([0, 0, 0])
        self.counts[-1][kind_index] += 1

    def series(self, now: float) -> list[tuple[int, int, int, int]]:
        """(bucket start, accepts, rejects, failsafes) for every bucket of the last BUCKETS, empty ones included."""
        last = int(now // BUCKET_S) * BUCKET_S
        known = dict(zip(self.start, self.counts, strict=True))
        return [
            (start, *known.get(start, (0, 0, 0)))
            for start in range(last - BUCKET_S * (BUCKETS - 1), last + 1, BUCKET_S)
        ]  # type: ignore[misc]


KINDS = ("accept", "reject", "failsafe")


@dataclass
class CameraView:
    """One camera of one agent."""

    agent_id: str
    line: str
    camera: str
    recent: deque[Verdict] = field(default_factory=lambda: deque(maxlen=RECENT_VERDICTS))
    keyed: dict[int, Verdict] = field(default_factory=dict)
    latencies: deque[tuple[float | None, ...]] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    buckets: Buckets = field(default_factory=Buckets)
    failsafes: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    totals: list[int] = field(default_factory=lambda: [0, 0, 0])
    last_verdict_mono: float = 0.0
    frame: Frame | None = None

    def add(self, verdict: Verdict, now: float) -> None:
        kind = KINDS.index(verdict.verdict)
        self.recent.append(verdict)
        self.keyed[verdict.seq] = verdict
        if len(self.keyed) > RECENT_KEYS:
            del self.keyed[next(iter(self.keyed))]
        self.latencies.append(tuple(getattr(verdict.latency_ms, stage) for stage in STAGES))
        self.buckets.add(now, kind)
        self.totals[kind] += 1
        if kind == 2:
            self.failsafes.append(time.monotonic())
        self.last_verdict_mono = time.monotonic()


@dataclass
class AgentView:
    """One agent: its latest status and when it arrived, and when each model it served went live."""

    agent_id: str
    line: str
    status: AgentStatus | None = None
    status_mono: float = 0.0
    queued: deque[int] = field(default_factory=lambda: deque(maxlen=QUEUE_HISTORY))
    live_since: dict[str, float] = field(default_factory=dict)  # model -> Unix time (a push's event, else first seen)
    live_from_event: set[str] = field(default_factory=set)


class LineState:
    """Everything the dashboard knows from the broker right now, for every line it follows.

    `lock` guards every view; readers that walk the views (views.line_view) hold it while they copy.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cameras: dict[tuple[str, str], CameraView] = {}
        self.agents: dict[str, AgentView] = {}
        self.actuators: dict[str, ActuatorStatus] = {}
        self._went_live: dict[tuple[str, str], float] = {}  # (agent, model) -> when an accepted push made it serve
        self._images: OrderedDict[tuple[str, str, int], tuple[str, bytes]] = OrderedDict()

    def remember_model_events(self, events: list[ModelEvent]) -> None:
        """Seed when each model went live from the stored push history (at start-up, oldest first)."""
        with self.lock:
            for event in events:
                if event.outcome == "accepted" and event.serving:
                    self._went_live[(event.agent_id, event.serving)] = event.ts

    def keep_image(self, key: tuple[str, str, int], content_type: str, image: bytes) -> None:
        """A gallery image, served from here until the store's writer has it on disk (and a while after)."""
        with self.lock:
            self._images[key] = (content_type, image)
            self._images.move_to_end(key)
            while len(self._images) > RECENT_IMAGES:
                self._images.popitem(last=False)

    def image(self, key: tuple[str, str, int]) -> tuple[str, bytes] | None:
        with self.lock:
            return self._images.get(key)

    def _mark_live(self, agent: AgentView, model: str, now: float) -> None:
        if model in agent.live_since:
            return
        went_live = self._went_live.get((agent.agent_id, model))
        agent.live_since[model] = now if went_live is None else went_live
        if went_live is not None:
            agent.live_from_event.add(model)

    # -- updates (MQTT thread) ------------------------------------------------------------------------------------

    def add_verdict(self, verdict: Verdict, now: float) -> bool:
        """Count and keep a verdict; False for a QoS 1 redelivery of one already here (nothing changes)."""
        with self.lock:
            view = self._camera(verdict.agent_id, verdict.line, verdict.camera)
            if view.keyed.get(verdict.seq) == verdict:
                return False
            view.add(verdict, now)
            agent = self._agent(verdict.agent_id, verdict.line)
            self._mark_live(agent, verdict.model, now)
            return True

    def add_frame(self, info: HeatmapInfo, line: str, image: bytes, now: float) -> Frame:
        with self.lock:
            view = self._camera(info.agent_id, line, info.camera)
            frame = Frame(info, image, now, view.keyed.get(info.seq))
            view.frame = frame
            return frame

    def verdict_of(self, agent_id: str, camera: str, seq: int) -> Verdict | None:
        with self.lock:
            view = self.cameras.get((agent_id, camera))
            return None if view is None else view.keyed.get(seq)

    def set_status(self, status: AgentStatus) -> AgentView:
        with self.lock:
            agent = self._agent(status.agent_id, status.line)
            agent.line = status.line
            agent.status = status
            agent.status_mono = time.monotonic()
            if status.online:
                agent.queued.append(status.mqtt_queued)
                if status.model is not None:
                    self._mark_live(agent, status.model, time.time())
            return agent

    def add_model_event(self, event: ModelEvent) -> str:
        """Record when a pushed or rolled-back model went live; the agent's line ("" if not seen yet)."""
        with self.lock:
            if event.outcome == "accepted" and event.serving:
                self._went_live[(event.agent_id, event.serving)] = event.ts
            agent = self.agents.get(event.agent_id)
            if agent is None:
                return ""
            if event.outcome == "accepted" and event.serving:
                agent.live_since[event.serving] = event.ts
                agent.live_from_event.add(event.serving)
            return agent.line

    def set_actuator(self, status: ActuatorStatus) -> ActuatorStatus | None:
        """Store the actuator's status; its previous one (None for the first)."""
        with self.lock:
            previous = self.actuators.get(status.actuator_id)
            self.actuators[status.actuator_id] = status
            return previous

    def line_of(self, agent_id: str) -> str:
        with self.lock:
            agent = self.agents.get(agent_id)
            return "" if agent is None else agent.line

    def _camera(self, agent_id: str, line: str, camera: str) -> CameraView:
        view = self.cameras.get((agent_id, camera))
        if view is None:
            view = self.cameras[(agent_id, camera)] = CameraView(agent_id, line, camera)
        view.line = line
        return view

    def _agent(self, agent_id: str, line: str) -> AgentView:
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = AgentView(agent_id, line)
        return agent

    # -- reads ----------------------------------------------------------------------------------------------------

    def thresholds(self) -> dict[str, float]:
        """model -> the threshold its latest scored verdicts used (the serving threshold, overrides included)."""
        found: dict[str, float] = {}
        with self.lock:
            for view in self.cameras.values():
                for verdict in view.recent:
                    if verdict.verdict != "failsafe":
                        found[verdict.model] = verdict.threshold
        return found

    def lines(self) -> list[str]:
        with self.lock:
            found = {agent.line for agent in self.agents.values()}
            found |= {view.line for view in self.cameras.values()}
            found |= {actuator.line for actuator in self.actuators.values()}
        return sorted(found)

    def facts(self, config: AlarmConfig) -> tuple[Facts, set[str]]:
        """What the alarm rules need, and the agents and actuators it covers."""
        now = time.monotonic()
        with self.lock:
            agents = tuple(
                AgentFacts(
                    agent_id=agent.agent_id,
                    line=agent.line,
                    online=agent.status.online,
                    reason=agent.status.reason,
                    status_age_s=now - agent.status_mono,
                    queued=tuple(agent.queued),
                )
                for agent in self.agents.values()
                if agent.status is not None
            )
            online = {agent.agent_id for agent in agents if agent.online}
            cameras = tuple(
                CameraFacts(
                    agent_id=view.agent_id,
                    line=view.line,
                    camera=view.camera,
                    verdict_age_s=now - view.last_verdict_mono,
                    failsafes_in_window=sum(1 for t in view.failsafes if t >= now - config.failsafe_window_s),
                )
                for view in self.cameras.values()
                if view.agent_id in online and view.last_verdict_mono > 0
            )
            actuators = tuple(self.actuators.values())
        subjects = {agent.agent_id for agent in agents} | {each.actuator_id for each in actuators}
        return Facts(agents, cameras, actuators), subjects
