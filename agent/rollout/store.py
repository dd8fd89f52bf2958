"""The agent's model store: verified bundles on disk, the active one, and the history for rollback.

    state_dir/models/<model_id>@<model_version>/   a verified bundle (copied in whole)
    state_dir/models/active -> <label>             symlink, replaced atomically (rename)
    state_dir/models/history.json                  activations, newest last
    state_dir/models/accepted.json                 per model id, the newest version ever accepted

An agent with several models ([[models]] in its config) has one active link and history per model
id, its *slot*: `active-<model_id>` and `history-<model_id>.json`; slot "" (one model) is the plain
`active` and `history.json` above. The active models survive agent restarts because the engine
serves them. Only the last `keep` models of a slot are kept, never its active or previous one, so
rollback is instant.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bundle import Manifest, verify_bundle, version_key
from ..config import AgentConfig

log = logging.getLogger(__name__)

ACTIVE = "active"
HISTORY = "history.json"
ACCEPTED = "accepted.json"


class ModelStoreError(Exception):
    """A store operation cannot be done (unknown model, nothing to roll back to)."""


def label_of(manifest: Manifest) -> str:
    return f"{manifest.model_id}@{manifest.model_version}"


class ModelStore:
    """Verified bundles under `root`; `install` never activates, `activate` never verifies twice.

    slot: the model id whose active link and history this object moves ("" = the agent's one model).
    """

    def __init__(self, root: Path, *, keep: int = 3, slot: str = "") -> None:
        if keep < 2:
            msg = f"keep must be >= 2 (the active model and the one to roll back to), got {keep}"
            raise ValueError(msg)
        if slot in (".", "..") or "/" in slot or "@" in slot:
            msg = f"model slot {slot!r} is not a model id"
            raise ValueError(msg)
        self.root = root
        self.keep = keep
        self.slot = slot
        self._history_file = root / (f"history-{slot}.json" if slot else HISTORY)
        root.mkdir(parents=True, exist_ok=True)

    def install(
        self,
        bundle_dir: Path,
        trusted_keys: Sequence[Ed25519PublicKey],
        *,
        require_signature: bool = True,
        admit: Callable[[Manifest], None] | None = None,
    ) -> Manifest:
        """Verify a bundle and copy it into the store; returns its manifest. Raises BundleError/SignatureError.

        admit: called with the verified manifest before anything is copied; raises BundleError to refuse it.
        """
        manifest = verify_bundle(bundle_dir, trusted_keys, require_signature=require_signature)
        if admit is not None:
            admit(manifest)
        target = self.root / label_of(manifest)
        if target.exists():
            verify_bundle(target, trusted_keys, require_signature=require_signature)  # same label: must be intact
            return manifest
        staging = self.root / f".{label_of(manifest)}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle_dir, staging)
        verify_bundle(staging, trusted_keys, require_signature=require_signature)  # the copy, not the source
        staging.rename(target)
        log.info("installed %s", label_of(manifest))
        return manifest

    def path(self, label: str) -> Path:
        path = self.root / label
        if not (path / "manifest.json").is_file():
            msg = f"model {label} is not in the store {self.root}; installed: {', '.join(self.labels()) or 'none'}"
            raise ModelStoreError(msg)
        return path

    def labels(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and "@" in p.name)

    @property
    def active_path(self) -> Path:
        return active_link(self.root, self.slot)

    def active(self) -> str | None:
        link = self.active_path
        return str(link.readlink()) if link.is_symlink() else None

    def history(self) -> list[str]:
        file = self._history_file
        return json.loads(file.read_text()) if file.is_file() else []

    def previous(self) -> str | None:
        """The model that was active before the current one, if it is still in the store."""
        active = self.active()
        for label in reversed(self.history()):
            if label != active and (self.root / label).is_dir():
                return label
        return None

    def activate(self, label: str) -> None:
        """Point `active` at label atomically and record it; prune old models."""
        self.path(label)
        temporary = self.root / f".{self.active_path.name}.tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(label)
        temporary.replace(self.active_path)  # rename(2): readers see the old or the new link, never none
        history = [entry for entry in self.history() if entry != label] + [label]
        write_atomically(self._history_file, (json.dumps(history[-50:]) + "\n").encode())
        self._record_accepted(label)
        self._prune()
        log.info("active model: %s", label)

    def newest_accepted(self, model_id: str) -> str | None:
        """The newest version of `model_id` this agent ever activated (rollbacks do not lower it)."""
        file = self.root / ACCEPTED
        accepted = json.loads(file.read_text()) if file.is_file() else {}
        version = accepted.get(model_id) if isinstance(accepted, dict) else None
        return version if isinstance(version, str) else None

    def _record_accepted(self, label: str) -> None:
        model_id, _, version = label.rpartition("@")
        newest = self.newest_accepted(model_id)
        if newest is not None and version_key(newest) >= version_key(version):
            return
        file = self.root / ACCEPTED
        accepted = json.loads(file.read_text()) if file.is_file() else {}
        accepted[model_id] = version
        write_atomically(file, (json.dumps(accepted, indent=1, sort_keys=True) + "\n").encode())

    def rollback(self) -> str:
        """Activate the previous model; returns its label."""
        previous = self.previous()
        if previous is None:
            msg = "no previous model to roll back to"
            raise ModelStoreError(msg)
        self.activate(previous)
        return previous

    def discard(self, label: str) -> None:
        """Remove a model that was installed but refused (never the active or previous one)."""
        if label not in {self.active(), self.previous()} and (self.root / label).is_dir():
            shutil.rmtree(self.root / label)

    def _prune(self) -> None:
        """Keep the last `keep` activated models (always the active and previous); installed, never-activated
        ones are left to their caller (`discard` on refusal)."""
        recent = [label for label in reversed(self.history()) if (self.root / label).is_dir()]
        keep = set(recent[: self.keep]) | {self.active(), self.previous()}
        for label in recent:
            if label not in keep:
                shutil.rmtree(self.root / label)
                log.info("pruned %s from the model store", label)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash or power cut leaves the old file or the new one, never a torn one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut only once the folder is on disk
    finally:
        os.close(directory)


def store_root(state_dir: Path) -> Path:
    return state_dir / "models"


def active_link(root: Path, slot: str) -> Path:
    """The active link of model slot `slot` in the store at root ("" = the one model's `active`)."""
    return root / (f"{ACTIVE}-{slot}" if slot else ACTIVE)


def serving_bundle(state_dir: Path, configured: Path, slot: str = "") -> Path:
    """The bundle to serve at start-up in `slot`: the store's active model there if any, else the configured one."""
    active = active_link(store_root(state_dir), slot)
    return active if active.is_symlink() and active.exists() else configured


def serving_bundles(config: AgentConfig) -> dict[str, Path]:
    """Model slot -> the bundle to serve at start-up, for every model the config names."""
    return {slot: serving_bundle(config.state_dir, bundle, slot) for slot, bundle in config.model_bundles.items()}
