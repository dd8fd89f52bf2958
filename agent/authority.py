"""Signed commands: who may change what an agent does, and why a recorded command cannot be replayed.

A command record (ModelCommand, SampleLabel) carries `key_id` and `signature`: an Ed25519 signature by an
operator key over the record's other fields (`signed_bytes()`), which name the agent it is for, when it was
issued and a random nonce. An agent accepts it only if the key is one it trusts for that kind of command,
the record names this agent, it was issued within `max_age_s` of the agent's clock (either way), and its
nonce has not been seen in that window. Seen nonces are kept on disk, so a restart does not reopen the window.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .signing import key_id

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 300.0
MAX_NONCES = 100_000  # nonces remembered at most; a flood past this is refused, never forgotten early


class CommandRefused(Exception):
    """A command is unsigned, signed by an untrusted key, for another agent, stale, or replayed."""


class SignedCommand(Protocol):
    @property
    def agent_id(self) -> str: ...
    @property
    def issued_ts(self) -> float: ...
    @property
    def nonce(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def signature(self) -> str: ...

    def signed_bytes(self) -> bytes: ...

    def model_copy(self, *, update: dict[str, object]) -> SignedCommand: ...


C = TypeVar("C", bound=SignedCommand)


def sign_command(command: C, private_key: Ed25519PrivateKey) -> C:
    """The command with key_id and signature filled in."""
    signature = base64.b64encode(private_key.sign(command.signed_bytes())).decode("ascii")
    signed = command.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": signature})
    return signed  # type: ignore[return-value]


class CommandVerifier:
    """Checks signed commands for one agent against its trusted keys; remembers nonces in `nonce_file`."""

    def __init__(
        self,
        agent_id: str,
        trusted_keys: Sequence[Ed25519PublicKey],
        nonce_file: Path,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        if max_age_s <= 0:
            msg = f"max_age_s must be > 0, got {max_age_s}"
            raise ValueError(msg)
        self.agent_id = agent_id
        self._keys = {key_id(key): key for key in trusted_keys}
        self._nonce_file = nonce_file
        self._max_age_s = max_age_s
        self._seen = self._load()

    def check(self, command: SignedCommand, *, now: float | None = None) -> str:
        """The signing key's id; CommandRefused with the reason otherwise. Records the nonce."""
        now = time.time() if now is None else now
        if not command.signature:
            msg = "the command is not signed; sign it with an operator key (lineguard-deploy --operator-key)"
            raise CommandRefused(msg)
        key = self._keys.get(command.key_id)
        if key is None:
            msg = f"the command is signed by key {command.key_id!r}, which this agent does not trust for commands"
            raise CommandRefused(msg)
        try:
            key.verify(base64.b64decode(command.signature, validate=True), command.signed_bytes())
        except (InvalidSignature, binascii.Error, ValueError) as error:
            msg = f"the signature by key {command.key_id} does not match the command: altered on the way?"
            raise CommandRefused(msg) from error
        self._check_fresh(command, now)
        self._remember(command.nonce, command.issued_ts, now)
        return command.key_id

    def _check_fresh(self, command: SignedCommand, now: float) -> None:
        if command.agent_id != self.agent_id:
            msg = f"the command is for agent {command.agent_id}, this is {self.agent_id}"
            raise CommandRefused(msg)
        age_s = now - command.issued_ts
        if abs(age_s) > self._max_age_s:
            msg = (
                f"the command was issued {age_s:.0f} s from this agent's clock (limit {self._max_age_s:.0f} s): "
                "a recorded command, or clocks out of step (check NTP)"
            )
            raise CommandRefused(msg)
        if command.nonce in self._seen:
            msg = f"nonce {command.nonce} was used before: a replayed command"
            raise CommandRefused(msg)

    def _remember(self, nonce: str, issued_ts: float, now: float) -> None:
        horizon = now - self._max_age_s
        self._seen = {seen: ts for seen, ts in self._seen.items() if ts >= horizon}
        if len(self._seen) >= MAX_NONCES:
            msg = f"{MAX_NONCES} commands within {self._max_age_s:.0f} s: refusing more until older ones expire"
            raise CommandRefused(msg)
        self._seen[nonce] = issued_ts
        temporary = self._nonce_file.with_name(self._nonce_file.name + ".tmp")
        self._nonce_file.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w") as handle:
            json.dump(self._seen, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._nonce_file)

    def _load(self) -> dict[str, float]:
        try:
            raw = json.loads(self._nonce_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            # Refusing every command forever would be worse; the timestamp window still bounds replays.
            log.warning("nonce file %s is unreadable (%s); starting with none remembered", self._nonce_file, error)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {str(nonce): float(ts) for nonce, ts in raw.items() if isinstance(ts, int | float)}
