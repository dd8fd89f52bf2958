"""Who is asking, per request: the session cookie or the trusted proxy's header; CSRF and origin checks on every
state-changing request; the security headers of every response."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Response

from .auth import USER_NAME, LoginThrottle, Sessions, Users
from .config import AuthConfig

log = logging.getLogger(__name__)

SESSION_COOKIE = "lineguard_session"
LOGIN_COOKIE = "lineguard_login"  # double-submit token of the login form (before there is a session)
CSRF_HEADER = "X-CSRF-Token"
SECURITY_HEADERS = {
    # Scripts, styles and images only from this server: no CDN, no inline script, nothing framed.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True, slots=True)
class Viewer:
    """The person behind a request: `user` is "" for an anonymous viewer; `csrf` the token their forms carry."""

    user: str
    csrf: str
    via: str  # "session", "proxy" or "" (anonymous)


class Access:
    """Request-level authentication built from the users file, the session key and the auth config."""

    def __init__(self, config: AuthConfig, users: Users, sessions: Sessions) -> None:
        self.config = config
        self.users = users
        self.sessions = sessions
        self.throttle = LoginThrottle(config.max_login_failures)

    @property
    def login_possible(self) -> bool:
        return len(self.users) > 0

    def viewer(self, request: Request) -> Viewer:
        proxied = self._proxy_user(request)
        if proxied:
            return Viewer(proxied, self.sessions.csrf_token(f"proxy:{proxied}"), "proxy")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        user = self.sessions.user(cookie, time.time()) if cookie else None
        if user is None:
            return Viewer("", "", "")
        return Viewer(user, self.sessions.csrf_token(cookie), "session")

    def _proxy_user(self, request: Request) -> str:
        header = self.config.proxy_header
        if not header or request.client is None or request.client.host not in self.config.trusted_proxies:
            return ""
        name = request.headers.get(header, "").strip()
        return name if USER_NAME.fullmatch(name) else ""

    def require(self, request: Request, token: str, *, action: str) -> str:
        """The user making a state-changing request: 401 if anonymous, 403 on a bad CSRF token or origin."""
        check_origin(request)
        viewer = self.viewer(request)
        if not viewer.user:
            raise HTTPException(401, f"log in to {action}")
        session = f"proxy:{viewer.user}" if viewer.via == "proxy" else request.cookies.get(SESSION_COOKIE, "")
        if not self.sessions.check_csrf(session, token):
            raise HTTPException(403, f"missing or stale CSRF token: reload the page, then {action} again")
        return viewer.user

    def login(self, request: Request, response: Response, name: str, password: str) -> str:
        """Check the form and set the session cookie; the user name, or HTTPException with the reason."""
        address = request.client.host if request.client is not None else "?"
        now = time.time()
        if self.throttle.blocked(address, now):
            log.warning("login refused for %s: too many failures", address)
            raise HTTPException(429, "too many failed logins from this address; wait 10 minutes")
        if not self.users.check(name, password):
            self.throttle.failed(address, now)
            log.warning("failed login as %r from %s", name[:64], address)
            raise HTTPException(401, "unknown user or wrong password")
        self.throttle.succeeded(address)
        cookie = self.sessions.issue(name, now)
        self.set_cookie(response, SESSION_COOKIE, cookie, request, max_age_s=int(self.sessions.lifetime_s))
        log.info("%s logged in from %s", name, address)
        return name

    def set_cookie(self, response: Response, name: str, value: str, request: Request, *, max_age_s: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age_s,
            httponly=True,
            samesite="strict",
            secure=self.config.cookie_secure or request.url.scheme == "https",
            path=request.scope.get("root_path") or "/",
        )


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def check_origin(request: Request) -> None:
    """403 when a browser says the request comes from another site (Origin or Referer naming another host)."""
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer", "")
    if not source:
        return  # not a browser (curl, a script): no ambient cookie to abuse
    if source == "null" or urlsplit(source).netloc != request.headers.get("host", ""):
        raise HTTPException(403, "cross-site request refused: open the dashboard itself and try again")
