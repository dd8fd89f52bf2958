"""The JSON, image, CSV and live-event routes the page's scripts call. Reads need no login; labelling and
acknowledging need a user and the session's CSRF token (header X-CSRF-Token)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lineguard.agent.contract import LabelKind

from .access import CSRF_HEADER
from .dashboard import Dashboard
from .history import HistoryQuery
from .hub import TooManyClients
from .labels import LabelRefused
from .views import alarm_list, gallery_list, label_list, line_view, plain

router = APIRouter(prefix="/api")

LineName = Annotated[str, Path(pattern=r"^(\+|[A-Za-z0-9_-]{1,64})$", description="A line, or + for every line.")]
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Filter = Annotated[str, Query(pattern=r"^[A-Za-z0-9._@+-]{0,200}$")]
GALLERY_KINDS = {"rejects": ("reject", "failsafe"), "close-calls": ("close-call",), "samples": ("random",)}
MAX_PAGE_ROWS = 1000


def dashboard_of(request: Request) -> Dashboard:
    return request.app.state.dashboard  # type: ignore[no-any-return]


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    """Broker link, pages following the feed and dropped inputs by kind: for monitoring."""
    board = dashboard_of(request)
    return {"broker": plain(board.feed.broker), "pages": board.hub.clients, "dropped": board.drops.totals()}


@router.get("/line/{line}/snapshot")
def snapshot(request: Request, line: LineName) -> dict[str, Any]:
    """Everything a freshly opened page shows; live events update it from then on."""
    board = dashboard_of(request)
    agents, cameras, actuators = line_view(board.state, line)
    viewer = board.access.viewer(request)
    return {
        "line": line,
        "now": time.time(),
        "broker": plain(board.feed.broker),
        "agents": plain(agents),
        "cameras": plain(cameras),
        "actuators": actuators,
        "alarms": plain(alarm_list(board.book.open_alarms(), line)),
        "gallery": gallery_list(board.store.gallery(line, limit=40, kinds=GALLERY_KINDS["rejects"])),
        "close_calls": gallery_list(board.store.gallery(line, limit=40, kinds=GALLERY_KINDS["close-calls"])),
        "viewer": {"user": viewer.user, "csrf": viewer.csrf, "can_login": board.access.login_possible},
        "labelling": board.labeller.enabled,
    }


@router.get("/line/{line}/events")
async def events(request: Request, line: LineName) -> StreamingResponse:
    """Server-sent events for one line: verdicts, frames, stats, agents, alarms, gallery, pushes, labels."""
    board = dashboard_of(request)
    try:
        stream = board.hub.stream(line)
        first = await anext(stream)
    except TooManyClients as error:
        raise HTTPException(503, str(error)) from error

    async def body() -> Any:
        yield first
        async for text in stream:
            yield text

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


@router.get("/frame/{agent}/{camera}")
def frame(request: Request, agent: Name, camera: Name) -> Response:
    """The latest image the agent published for the camera (its heatmap overlay)."""
    board = dashboard_of(request)
    with board.state.lock:
        view = board.state.cameras.get((agent, camera))
        latest = None if view is None else view.frame
    if latest is None:
        raise HTTPException(
            404, f"no image from {agent}/{camera} yet: the agent publishes heatmaps for rejects (decision.heatmap)"
        )
    return Response(latest.image, media_type=latest.info.content_type, headers={"Cache-Control": "no-store"})


@router.get("/gallery")
def gallery(
    request: Request,
    line: Annotated[str, Query(pattern=r"^(\+|[A-Za-z0-9_-]{1,64})$")] = "+",
    kind: Annotated[str, Query(pattern=r"^(rejects|close-calls|samples)$")] = "rejects",
    limit: Annotated[int, Query(ge=1, le=500)] = 60,
) -> list[dict[str, Any]]:
    return gallery_list(dashboard_of(request).store.gallery(line, limit=limit, kinds=GALLERY_KINDS[kind]))


@router.get("/gallery/{agent}/{camera}/{seq}")
def gallery_entry(request: Request, agent: Name, camera: Name, seq: Annotated[int, Path(ge=0)]) -> dict[str, Any]:
    """One gallery entry and the labels this dashboard sent for its sample."""
    board = dashboard_of(request)
    entry = board.store.gallery_entry(agent, camera, seq)
    if entry is None:
        raise HTTPException(404, f"{agent}/{camera} seq {seq} is not in the gallery (older than retention?)")
    labels = board.store.labels(limit=20, agent_id=agent, sample_id=entry.sample_id) if entry.sample_id else []
    return {"entry": plain(entry), "labels": label_list(labels)}


@router.get("/gallery/{agent}/{camera}/{seq}/image")
def gallery_image(request: Request, agent: Name, camera: Name, seq: Annotated[int, Path(ge=0)]) -> Response:
    board = dashboard_of(request)
    found = board.state.image((agent, camera, seq)) or board.store.gallery_image(agent, camera, seq)
    if found is None:
        raise HTTPException(404, f"no image for {agent}/{camera} seq {seq}: no heatmap or sample thumbnail arrived")
    return Response(found[1], media_type=found[0], headers={"Cache-Control": "private, max-age=60"})


class LabelForm(BaseModel):
    """A label request from the page: which gallery entry, and what it shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    camera: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    seq: int = Field(ge=0)
    label: LabelKind
    defect_type: str = Field("", pattern=r"^[a-z0-9_-]{0,64}$")


@router.post("/labels")
def post_label(
    request: Request, form: LabelForm, csrf: Annotated[str, Header(alias=CSRF_HEADER)] = ""
) -> dict[str, Any]:
    """Sign and send a label for a stored sample; 401/403 without a user or token, 409 if it cannot be sent."""
    board = dashboard_of(request)
    user = board.access.require(request, csrf, action="label samples")
    entry = board.store.gallery_entry(form.agent_id, form.camera, form.seq)
    if entry is None:
        raise HTTPException(404, f"{form.agent_id}/{form.camera} seq {form.seq} is not in the gallery")
    try:
        row = board.labeller.label(entry, form.label, form.defect_type, user)
    except LabelRefused as error:
        raise HTTPException(409, str(error)) from error
    return plain(row)  # type: ignore[no-any-return]


@router.get("/labels")
def labels(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    return label_list(dashboard_of(request).store.labels(limit=limit))


@router.get("/alarms")
def alarms(
    request: Request,
    line: Annotated[str, Query(pattern=r"^(\+|[A-Za-z0-9_-]{1,64})$")] = "+",
    history: bool = False,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[dict[str, Any]]:
    """Open alarms of a line, or (history=true) every alarm, newest first, with who acknowledged it and when."""
    board = dashboard_of(request)
    found = board.store.alarm_history(limit) if history else board.book.open_alarms()
    return plain(alarm_list(found, line))  # type: ignore[no-any-return]


@router.post("/alarms/{alarm_id}/ack")
def acknowledge(
    request: Request, alarm_id: Annotated[int, Path(ge=1)], csrf: Annotated[str, Header(alias=CSRF_HEADER)] = ""
) -> dict[str, Any]:
    board = dashboard_of(request)
    user = board.access.require(request, csrf, action="acknowledge alarms")
    alarm = board.book.acknowledge(alarm_id, user, time.time())
    if alarm is None:
        raise HTTPException(409, f"alarm {alarm_id} is not open or was acknowledged already: reload the page")
    board.feed.publish_alarm(alarm)
    return plain(alarm)  # type: ignore[no-any-return]


def history_query(
    start: float, end: float, line: str, agent: str, camera: str, verdict: str, model: str, before: int
) -> HistoryQuery:
    if end < start:
        raise HTTPException(400, f"end ({end}) is before start ({start})")
    return HistoryQuery(start, end, line, agent, camera, verdict, model, before)


Start = Annotated[float, Query(ge=0, description="From, Unix seconds.")]
End = Annotated[float, Query(ge=0, description="To, Unix seconds.")]
VerdictFilter = Annotated[str, Query(pattern=r"^(accept|reject|failsafe)?$")]


@router.get("/history")
def history(
    request: Request,
    start: Start,
    end: End,
    line: Filter = "",
    agent: Filter = "",
    camera: Filter = "",
    verdict: VerdictFilter = "",
    model: Filter = "",
    before: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_ROWS)] = 200,
) -> dict[str, Any]:
    """Verdicts decided between start and end matching the filters, newest first; `next` pages on."""
    query = history_query(start, end, line, agent, camera, verdict, model, before)
    rows, total = dashboard_of(request).history.page(query, limit)
    return {
        "total": total,
        "rows": [verdict.model_dump(mode="json") for _, verdict in rows],
        "next": rows[-1][0] if len(rows) == limit else 0,
    }


@router.get("/history.csv")
def history_csv(
    request: Request,
    start: Start,
    end: End,
    line: Filter = "",
    agent: Filter = "",
    camera: Filter = "",
    verdict: VerdictFilter = "",
    model: Filter = "",
) -> StreamingResponse:
    """The same search as CSV, oldest first, every matching row (streamed; the traceability export)."""
    query = history_query(start, end, line, agent, camera, verdict, model, 0)
    name = f"verdicts-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(start))}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(
        dashboard_of(request).history.csv_lines(query), media_type="text/csv; charset=utf-8", headers=headers
    )


@router.get("/pushes")
def pushes(
    request: Request, agent: Filter = "", limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> list[dict[str, Any]]:
    """Model pushes and rollbacks (ModelEvent records), newest first, with their shadow results."""
    return [event.model_dump(mode="json") for event in dashboard_of(request).store.pushes(limit=limit, agent_id=agent)]
