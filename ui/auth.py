"""Who may label and acknowledge: users with scrypt-hashed passwords in a file, or a trusted reverse proxy's
header; a signed session cookie; a CSRF token bound to the session for every state-changing request.

Reading the page needs no login. The users file holds one `name:scrypt$N$r$p$salt$hash` line per user
(base64 salt and hash; `lineguard-ui add-user` writes them). The session cookie carries the user name
and expiry, signed with HMAC-SHA256 by a random key kept in state_dir (so logins survive a restart and
nobody can forge one without that file).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # 16 MiB and ~50 ms per check on one core
SALT_BYTES = 16
HASH_BYTES = 32
KEY_BYTES = 32
MAX_PASSWORD_CHARS = 1024
FAILURE_WINDOW_S = 600.0
MAX_TRACKED_ADDRESSES = 10_000


class AuthError(Exception):
    """The users file or the session key cannot be read or is malformed; the message names the file and line."""


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$hash` for a new password."""
    if not password or len(password) > MAX_PASSWORD_CHARS:
        msg = f"a password must have 1 to {MAX_PASSWORD_CHARS} characters"
        raise ValueError(msg)
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encoded[0]}${encoded[1]}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 2**20, dklen=HASH_BYTES)


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse_hash(text: str, where: str) -> _Hash:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        msg = f"{where}: expected name:scrypt$N$r$p$salt$hash (write it with `lineguard-ui add-user`)"
        raise AuthError(msg)
    try:
        n, r, p = (int(each) for each in parts[1:4])
        salt, digest = (base64.b64decode(each, validate=True) for each in parts[4:6])
    except ValueError as error:
        msg = f"{where}: unreadable scrypt parameters or base64 ({error})"
        raise AuthError(msg) from error
    if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or len(digest) != HASH_BYTES:
        msg = f"{where}: scrypt parameters out of range (N a power of two 1024..1048576, r 1..32, p 1..16)"
        raise AuthError(msg)
    return _Hash(n, r, p, salt, digest)


class Users:
    """The users file, read once at start-up (restart the dashboard after `add-user`)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._users: dict[str, _Hash] = {} if path is None else self._load(path)
        self._dummy = _Hash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"0" * SALT_BYTES, b"0" * HASH_BYTES)

    @staticmethod
    def _load(path: Path) -> dict[str, _Hash]:
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            msg = f"cannot read the users file {path}: {error.strerror}; create it with `lineguard-ui add-user`"
            raise AuthError(msg) from error
        users = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, hashed = line.strip().partition(":")
            if not USER_NAME.fullmatch(name):
                msg = f"{path}:{number}: user name must be 1-64 letters, digits, '.', '_', '@' or '-'"
                raise AuthError(msg)
            users[name] = _parse_hash(hashed, f"{path}:{number}")
        return users

    def __len__(self) -> int:
        return len(self._users)

    def check(self, name: str, password: str) -> bool:
        """True for a known user and their password; as slow for unknown users (no name probing by timing)."""
        known = self._users.get(name)
        stored = known or self._dummy
        if len(password) > MAX_PASSWORD_CHARS:
            return False
        digest = _scrypt(password, stored.salt, stored.n, stored.r, stored.p)
        return known is not None and hmac.compare_digest(digest, stored.digest)


def add_user(path: Path, name: str, password: str) -> None:
    """Add or replace `name` in the users file (mode 0600), keeping every other line."""
    if not USER_NAME.fullmatch(name):
        msg = f"user name {name[:80]!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
        raise ValueError(msg)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0].strip() != name]
    text = "\n".join([*kept, f"{name}:{hash_password(password)}"]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def load_session_key(path: Path) -> bytes:
    """The HMAC key for session cookies, made on first use (mode 0600)."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        log.info("made a new session key %s", path)
        return key
    except OSError as error:
        msg = f"cannot read the session key {path}: {error.strerror}; check state_dir's permissions"
        raise AuthError(msg) from error
    if len(key) != KEY_BYTES:
        msg = f"session key {path} has {len(key)} bytes, expected {KEY_BYTES}: delete it (everyone logs in again)"
        raise AuthError(msg)
    return key


class Sessions:
    """Signed session cookies `name|expiry|mac` and the CSRF token that goes with each."""

    def __init__(self, key: bytes, *, lifetime_s: float) -> None:
        self._key = key
        self.lifetime_s = lifetime_s

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str, now: float) -> str:
        body = f"{name}|{int(now + self.lifetime_s)}"
        return f"{body}|{self._mac('session|' + body)}"

    def user(self, cookie: str, now: float) -> str | None:
        """The user of a valid, unexpired cookie; None otherwise."""
        name, _, rest = cookie.partition("|")
        expiry, _, mac = rest.partition("|")
        if not USER_NAME.fullmatch(name) or not expiry.isdigit() or int(expiry) < now:
            return None
        return name if hmac.compare_digest(mac, self._mac(f"session|{name}|{expiry}")) else None

    def csrf_token(self, session: str) -> str:
        """The token every form and POST of this session (a cookie, or `proxy:<user>`) must carry."""
        return self._mac("csrf|" + session)

    def check_csrf(self, session: str, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token, self.csrf_token(session))


class LoginThrottle:
    """Failed logins per client address in the last FAILURE_WINDOW_S; past the limit, logins are refused."""

    def __init__(self, max_failures: int) -> None:
        self._max = max_failures
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, address: str, now: float) -> bool:
        with self._lock:
            recent = [t for t in self._failures.get(address, []) if t > now - FAILURE_WINDOW_S]
            self._failures[address] = recent
            return len(recent) >= self._max

    def failed(self, address: str, now: float) -> None:
        with self._lock:
            if len(self._failures) >= MAX_TRACKED_ADDRESSES:
                self._failures = {
                    key: value for key, value in self._failures.items() if value and value[-1] > now - FAILURE_WINDOW_S
                }
            self._failures.setdefault(address, []).append(now)
            del self._failures[address][: -self._max]

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
