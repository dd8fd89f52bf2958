"""A fleet rollout's state file: the plan and each agent's outcome, rewritten atomically after every step.

Re-running the same `lineguard-deploy rollout` reads it and carries on where it stopped (the operator's machine
restarted, the terminal closed); a different bundle while a rollout is unfinished is refused with the reason.
Default place: $XDG_STATE_HOME/lineguard/rollout.json (~/.local/state/lineguard/rollout.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lineguard.agent.bundle import MANIFEST_FILE, BundleError

AgentOutcome = Literal[
    "pending",  # not pushed yet
    "accepted",  # the agent serves the new model; soaking
    "soaked",  # passed its wave's soak: keeps the new model
    "refused",  # refused the push (signature, canary, targets ...): serves what it served
    "rolled-back",  # accepted, then rolled back with its wave
    "rollback-failed",  # accepted, and the rollback was refused or not answered: may still serve the new model
    "skipped",  # not pushed: an earlier agent halted the rollout
]
RolloutPhase = Literal["running", "done", "halted", "halted-rollback-incomplete"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class AgentState(_Record):
    wave: int = Field(ge=0, description="Index into RolloutState.waves.")
    previous: str = Field("", description="The model it served before the push (id@version); '' = unknown.")
    outcome: AgentOutcome = "pending"
    serving: str = Field("", description="What it serves as far as the rollout knows.")
    reason: str = ""


class RolloutState(_Record):
    """Everything needed to resume a rollout: what, to whom, in which waves, with which rules, and how far."""

    version: Literal[1] = 1
    bundle: str = Field(description="Absolute path of the bundle directory.")
    manifest_sha256: str = Field(description="Identifies the bundle: its manifest covers every file.")
    model: str = Field(description="id@version of the bundle.")
    selector: str
    waves_spec: str
    abort_if: str
    soak_s: float
    waves: list[list[str]]
    agents: dict[str, AgentState]
    phase: RolloutPhase = "running"
    wave: int = Field(0, description="The wave in progress (or the last one).")
    started_ts: float
    updated_ts: float


def manifest_digest(bundle: Path) -> str:
    """sha256 of the bundle's manifest.json: one bundle, one digest (the manifest names every file's sha256)."""
    try:
        return hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError as error:
        msg = f"{bundle} is not a bundle: cannot read {MANIFEST_FILE}: {error}"
        raise BundleError(msg) from error


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lineguard" / "rollout.json"


class StateFileError(Exception):
    """The state file cannot be read, or holds an unfinished rollout of another bundle."""


def load_state(path: Path) -> RolloutState | None:
    """The state in `path`; None when there is none. StateFileError for a file that is not a rollout state."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        msg = f"cannot read the rollout state {path}: {error}"
        raise StateFileError(msg) from error
    try:
        return RolloutState.model_validate_json(data)
    except ValidationError as error:
        msg = f"{path} is not a rollout state file ({error.error_count()} problems, first: {error.errors()[0]['msg']}); move it away or pass --state"
        raise StateFileError(msg) from None


def save_state(path: Path, state: RolloutState) -> None:
    """Write atomically: a temporary file in the same folder, fsync, rename over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(state.model_dump(mode="json"), indent=1).encode()
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_resumable(state: RolloutState, *, manifest_sha256: str, path: Path) -> None:
    """StateFileError when `state` is an unfinished rollout of another bundle than the one given now."""
    if state.phase == "running" and state.manifest_sha256 != manifest_sha256:
        msg = (
            f"{path} holds an unfinished rollout of {state.model} from {state.bundle} (wave {state.wave + 1} of "
            f"{len(state.waves)}); re-run with that bundle to finish it, or pass another --state FILE"
        )
        raise StateFileError(msg)
