"""What the operator sees of the fleet on the broker: each agent's retained status and its live verdict counts.

FleetWatch subscribes to the agents' status topic and their verdicts (through the contract) and keeps, per
agent, the latest AgentStatus, when it was heard, the model on the latest verdict of each camera, and verdict
counts per model (accept, reject, failsafe): what `lineguard-deploy status` prints and what a rollout's soak
judges. fleet_table() turns a snapshot into the status table.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from lineguard.agent.contract import AgentStatus, Topics, Verdict
from lineguard.agent.contract.topics import ANY
from lineguard.agent.mqtt import Subscription
from lineguard.deploy.commands import records
from lineguard.deploy.config import DeployConfig


@dataclass(frozen=True, slots=True)
class Rates:
    """Verdicts of one agent with one model: how many, and the shares that were reject and failsafe (0..1)."""

    frames: int
    rejects: int
    failsafes: int

    @property
    def reject_rate(self) -> float:
        return self.rejects / self.frames if self.frames else 0.0

    @property
    def failsafe_rate(self) -> float:
        return self.failsafes / self.frames if self.frames else 0.0


@dataclass
class AgentView:
    """One agent as heard on the broker."""

    status: AgentStatus | None = None
    status_heard: float = 0.0  # time.monotonic() when its status last arrived; 0 = never
    camera_models: dict[str, str] = field(default_factory=dict)  # camera -> model on its latest verdict
    counts: dict[str, list[int]] = field(default_factory=dict)  # model -> [frames, rejects, failsafes]

    def rates(self, model: str) -> Rates:
        frames, rejects, failsafes = self.counts.get(model, (0, 0, 0))
        return Rates(frames, rejects, failsafes)


class FleetWatch:
    """Statuses of all agents (`agents` None) or of the named ones, plus verdicts of the named ones (or all)."""

    def __init__(self, config: DeployConfig, agents: Iterable[str] | None = None, *, verdicts: bool = True) -> None:
        topics = Topics(config.mqtt.topic_prefix)
        names = sorted(agents) if agents is not None else [ANY]
        filters = [topics.status(name) for name in names]
        if verdicts:
            filters += [topics.verdict(ANY, name, ANY) for name in names]
        self._lock = threading.Lock()
        self._views: dict[str, AgentView] = {}
        on_status, on_verdict = records(AgentStatus, self._on_status), records(Verdict, self._on_verdict)

        def on_message(topic: str, payload: bytes, properties: object) -> None:
            match = topics.match(topic)
            is_status = match is not None and match.channel.name == "status"
            (on_status if is_status else on_verdict)(topic, payload, properties)

        self._subscription = Subscription(config.mqtt, f"lineguard-fleet-{uuid.uuid4().hex[:8]}", filters, on_message)

    def _view(self, agent: str) -> AgentView:
        return self._views.setdefault(agent, AgentView())

    def _on_status(self, status: AgentStatus) -> None:
        with self._lock:
            view = self._view(status.agent_id)
            view.status, view.status_heard = status, time.monotonic()

    def _on_verdict(self, verdict: Verdict) -> None:
        with self._lock:
            view = self._view(verdict.agent_id)
            view.camera_models[verdict.camera] = verdict.model
            counts = view.counts.setdefault(verdict.model, [0, 0, 0])
            counts[0] += 1
            counts[1] += verdict.verdict == "reject"
            counts[2] += verdict.verdict == "failsafe"

    def snapshot(self) -> dict[str, AgentView]:
        """agent id -> a copy of what was heard of it so far."""
        with self._lock:
            return {
                agent: AgentView(
                    view.status,
                    view.status_heard,
                    dict(view.camera_models),
                    {model: list(counts) for model, counts in view.counts.items()},
                )
                for agent, view in self._views.items()
            }

    def view(self, agent: str) -> AgentView:
        return self.snapshot().get(agent, AgentView())

    def close(self) -> None:
        self._subscription.close()

    def __enter__(self) -> FleetWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def previous_model(status: AgentStatus | None, model_id: str) -> str:
    """The label ("id@version") an agent serves for `model_id` now, from its status; "" where it serves none.

    With a model per camera, the model of the cameras that use `model_id`; with one model, that model (a push of
    another id replaces it)."""
    if status is None:
        return ""
    same_id = [label for label in status.serving() if label.split("@", 1)[0] == model_id]
    return same_id[0] if same_id else status.model or ""


def serving(view: AgentView) -> str:
    """What an agent serves, as one string: the model of each camera's latest verdict, else what its status says
    (its model, or each camera's where cameras have their own)."""
    models = sorted(set(view.camera_models.values()))
    if not models and view.status is not None:
        models = list(view.status.serving())
    return ", ".join(models) or "—"


TABLE_HEADER = ("AGENT", "LINE", "ONLINE", "HEALTH", "BACKEND", "CAMERA", "MODEL", "FPS", "FAILSAFE")


def fleet_rows(views: dict[str, AgentView]) -> list[tuple[str, ...]]:
    """One row per camera of each agent (one row for an agent without cameras), sorted by agent and camera."""
    rows: list[tuple[str, ...]] = []
    for agent, view in sorted(views.items()):
        status = view.status
        if status is None:
            continue  # verdicts heard, but no retained status: not an agent the broker knows about
        online = "yes" if status.online else "no"
        if status.online:
            health = status.health.state if status.health is not None else "—"
        else:
            health = status.reason or "last will"
        backend = status.backend.name if status.backend is not None else "—"
        cameras = sorted(set(status.cameras) | set(view.camera_models)) or ["—"]
        for camera in cameras:
            each = status.cameras.get(camera)
            model = view.camera_models.get(camera) or (each.model if each is not None else None) or status.model or "—"
            fps = f"{each.fps:.1f}" if each is not None else "—"
            failsafe = f"{100 * each.failsafe_share:.1f} %" if each is not None else "—"
            rows.append((agent, status.line, online, health, backend, camera, model, fps, failsafe))
    return rows


def format_table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    """Plain-text columns, left-aligned, two spaces apart: readable in a terminal, a log and a test."""
    lines = [header, *rows]
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
