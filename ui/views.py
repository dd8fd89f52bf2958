"""What the page is sent: typed, JSON-ready views of the in-memory state (the browser never parses MQTT payloads).

Contract records travel as `record.model_dump()`; everything else as a frozen dataclass through `plain()`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .alarms import Alarm
from .state import BUCKET_S, KINDS, STAGES, AgentView, CameraView, LineState
from .store import GalleryEntry, LabelRow


def plain(value: Any) -> Any:
    """Dataclasses and contract records as JSON-ready dicts and lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [plain(each) for each in value]
    if isinstance(value, dict):
        return {key: plain(each) for key, each in value.items()}
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class StageLatency:
    """One latency stage over the camera's last verdicts: median and 99th percentile, milliseconds."""

    stage: str
    p50_ms: float | None
    p99_ms: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class CameraStats:
    """Rates and latencies of one camera. series: (bucket start Unix s, accepts, rejects, failsafes) per 10 s."""

    agent_id: str
    line: str
    camera: str
    series: list[tuple[int, int, int, int]]
    bucket_s: int
    latency: list[StageLatency]
    totals: dict[str, int]
    verdict_age_s: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class FrameRef:
    """The latest published frame of a camera: fetch its bytes from /api/frame/<agent>/<camera>?seq=<seq>."""

    agent_id: str
    camera: str
    seq: int
    model: str
    image_format: str
    received_ts: float
    verdict: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class AgentCard:
    """One agent: online state, serving model (with threshold and when it went live), back end, queues."""

    agent_id: str
    line: str
    online: bool
    reason: str
    status_ts: float | None
    model: str
    threshold: float | None
    live_since: float | None
    live_from_event: bool
    backend: str
    backend_detail: str
    queue_depth: int
    mqtt_queued: int
    fps: dict[str, float]


def percentile(sorted_values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (share in 0..1) of already sorted values; None for none."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values) - 1, max(0, round(share * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[rank], 3)


def camera_stats(view: CameraView, now: float) -> CameraStats:
    latency = []
    for index, stage in enumerate(STAGES):
        values = sorted(value for each in view.latencies if (value := each[index]) is not None)
        latency.append(StageLatency(stage, percentile(values, 0.5), percentile(values, 0.99)))
    age = time.monotonic() - view.last_verdict_mono if view.last_verdict_mono else None
    return CameraStats(
        agent_id=view.agent_id,
        line=view.line,
        camera=view.camera,
        series=view.buckets.series(now),
        bucket_s=BUCKET_S,
        latency=latency,
        totals=dict(zip(KINDS, view.totals, strict=True)),
        verdict_age_s=None if age is None else round(age, 1),
    )


def frame_ref(view: CameraView) -> FrameRef | None:
    frame = view.frame
    if frame is None:
        return None
    return FrameRef(
        agent_id=frame.info.agent_id,
        camera=frame.info.camera,
        seq=frame.info.seq,
        model=frame.info.model,
        image_format=frame.info.format,
        received_ts=frame.received_ts,
        verdict=None if frame.verdict is None else frame.verdict.model_dump(mode="json"),
    )


def agent_card(agent: AgentView, thresholds: dict[str, float]) -> AgentCard:
    status = agent.status
    model = ", ".join(status.serving()) if status is not None else ""  # a model per camera: each panel has its own
    return AgentCard(
        agent_id=agent.agent_id,
        line=agent.line,
        online=bool(status and status.online),
        reason="" if status is None else status.reason,
        status_ts=None if status is None else status.ts,
        model=model,
        threshold=thresholds.get(model),
        live_since=agent.live_since.get(model),
        live_from_event=model in agent.live_from_event,
        backend="" if status is None or status.backend is None else status.backend.name,
        backend_detail="" if status is None or status.backend is None else status.backend.detail,
        queue_depth=0 if status is None else status.queue_depth,
        mqtt_queued=0 if status is None else status.mqtt_queued,
        fps={} if status is None else {name: camera.fps for name, camera in status.cameras.items()},
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CameraCard:
    agent_id: str
    line: str
    camera: str
    recent: list[dict[str, Any]]
    frame: FrameRef | None
    stats: CameraStats


def line_view(state: LineState, line: str) -> tuple[list[AgentCard], list[CameraCard], list[dict[str, Any]]]:
    """Agents, cameras and actuators of `line` ('+' = every line), sorted by name."""
    now = time.time()
    with state.lock:
        cameras = [view for _, view in sorted(state.cameras.items()) if line in ("+", view.line)]
        thresholds = state.thresholds()
        camera_cards = []
        for view in cameras:
            recent = [verdict.model_dump(mode="json") for verdict in view.recent]
            camera_cards.append(
                CameraCard(view.agent_id, view.line, view.camera, recent, frame_ref(view), camera_stats(view, now))
            )
        agents = [
            agent_card(agent, thresholds) for _, agent in sorted(state.agents.items()) if line in ("+", agent.line)
        ]
        actuators = [
            status.model_dump(mode="json")
            for _, status in sorted(state.actuators.items())
            if line in ("+", status.line)
        ]
    return agents, camera_cards, actuators


def alarm_list(alarms: list[Alarm], line: str) -> list[Alarm]:
    """The alarms of `line` ('+' = every line), and those whose line is not known yet ("")."""
    return [alarm for alarm in alarms if line == "+" or alarm.line in (line, "")]


def gallery_list(entries: list[GalleryEntry]) -> list[dict[str, Any]]:
    return [plain(entry) for entry in entries]


def label_list(rows: list[LabelRow]) -> list[dict[str, Any]]:
    return [plain(row) for row in rows]
