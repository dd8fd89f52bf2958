"""The ASGI app: pages, API and static files (shipped in the package: no build step, no CDN), security headers on
every response, and bad requests answered 4xx with a one-line reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lineguard.agent.contract import clip

from . import api, pages
from .access import SECURITY_HEADERS
from .dashboard import Dashboard

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_REASON_CHARS = 300


def create_app(dashboard: Dashboard, *, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app for one dashboard; it starts the broker feed when the server starts and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dashboard.start(asyncio.get_running_loop())
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            dashboard.close()

    app = FastAPI(
        title="Lineguard line dashboard",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        root_path=dashboard.config.http.root_path,
    )
    app.state.dashboard = dashboard
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(RequestValidationError, _bad_request)  # type: ignore[arg-type]
    return app


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response (pure ASGI: live event streams pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.headers if name not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """400 with the first problems as one readable line (`query.limit: Input should be ...`), bounded."""
    problems = []
    for each in error.errors()[:3]:
        where = ".".join(str(part) for part in each.get("loc", ()))
        problems.append(f"{where}: {each.get('msg', 'invalid')}")
    return JSONResponse({"detail": clip("; ".join(problems) or "bad request", MAX_REASON_CHARS)}, status_code=400)
