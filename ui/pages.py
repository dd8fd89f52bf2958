"""The HTML pages (rendered once; the scripts fill them from the API and keep them live) and login/logout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from .access import LOGIN_COOKIE, SESSION_COOKIE, check_origin, new_login_token
from .api import LineName, dashboard_of

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
router = APIRouter()


def render(request: Request, template: str, *, status_code: int = 200, **values: Any) -> HTMLResponse:
    board = dashboard_of(request)
    viewer = board.access.viewer(request)
    context = {
        "root": request.scope.get("root_path", ""),
        "viewer": viewer,
        "can_login": board.access.login_possible,
        "followed": board.config.line,
        **values,
    }
    return TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> Response:
    """The followed line's page, or a list of the lines seen on the broker when the dashboard follows all."""
    board = dashboard_of(request)
    root = request.scope.get("root_path", "")
    lines = board.state.lines()
    if board.config.line != "+":
        return RedirectResponse(f"{root}/line/{board.config.line}", status_code=303)
    if len(lines) == 1:
        return RedirectResponse(f"{root}/line/{lines[0]}", status_code=303)
    return render(request, "index.html", lines=lines, page="index", line="+")


@router.get("/line/{line}", response_class=HTMLResponse)
def line_page(request: Request, line: LineName) -> HTMLResponse:
    return render(request, "line.html", line=line, page="line")


@router.get("/history", response_class=HTMLResponse)
def history_page(request: Request) -> HTMLResponse:
    return render(request, "history.html", line=dashboard_of(request).config.line, page="history")


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request) -> HTMLResponse:
    board = dashboard_of(request)
    mqtt = board.config.mqtt
    broker = f"--host {mqtt.host} --port {mqtt.port}" + (f" --username {mqtt.username}" if mqtt.username else "")
    return render(request, "models.html", line=board.config.line, page="models", broker=broker)


@router.get("/alarms", response_class=HTMLResponse)
def alarms_page(request: Request) -> HTMLResponse:
    return render(request, "alarms.html", line=dashboard_of(request).config.line, page="alarms")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, error: str = "") -> HTMLResponse:
    token = new_login_token()
    response = render(
        request, "login.html", line=dashboard_of(request).config.line, page="login", token=token, error=error[:200]
    )
    dashboard_of(request).access.set_cookie(response, LOGIN_COOKIE, token, request, max_age_s=3600)
    return response


@router.post("/login")
def login(
    request: Request,
    user: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=100)],
) -> Response:
    """Check the form's double-submit token and the password; back to the page, with the session cookie set."""
    board = dashboard_of(request)
    check_origin(request)
    if not csrf_token or csrf_token != request.cookies.get(LOGIN_COOKIE):
        raise HTTPException(403, "the login form expired or came from another site: reload it and try again")
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/", status_code=303)
    try:
        board.access.login(request, response, user, password)
    except HTTPException as error:
        return render(
            request, "login.html", status_code=error.status_code, line=board.config.line, page="login",
            token=csrf_token, error=str(error.detail),
        )  # fmt: skip
    response.delete_cookie(LOGIN_COOKIE, path=root or "/")
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form(max_length=100)]) -> Response:
    board = dashboard_of(request)
    board.access.require(request, csrf_token, action="log out")
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=root or "/")
    return response
