"""The agent's model store: verified bundles on disk, the active one, and the history for rollback.

    state_dir/models/<model_id>@<model_version>/   a verified bundle (copied in whole)
    state_dir/models/active -> <label>             symlink, replaced atomically (rename)
    state_dir/models/history.json                  activations, newest last
    state_dir/models/accepted.json                 per model id, the newest version ever accepted

The active model survives agent restarts because the engine serves `models/active`. Only the
last `keep` models are kept, never the active or the previous one, so rollback is instant.
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

log = logging.getLogger(__name__)

ACTIVE = "active"
HISTORY = "history.json"
ACCEPTED = "accepted.json"


class ModelStoreError(Exception):
    """A store operation cannot be done (unknown model, nothing to roll back to)."""


def label_of(manifest: Manifest) -> str:
    return f"{manifest.model_id}@{manifest.model_version}"


class ModelStore:
    """Verified bundles under `root`; `install` never activates, `activate` never verifies twice."""

    def __init__(self, root: Path, *, keep: int = 3) -> None:
        if keep < 2:
            msg = f"keep must be >= 2 (the active model and the one to roll back to), got {keep}"
            raise ValueError(msg)
        self.root = root
        self.keep = keep
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
        return self.root / ACTIVE

    def active(self) -> str | None:
        link = self.active_path
        return str(link.readlink()) if link.is_symlink() else None

    def history(self) -> list[str]:
        file = self.root / HISTORY
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
        temporary = self.root / f".{ACTIVE}.tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(label)
        temporary.replace(self.active_path)  # rename(2): readers see the old or the new link, never none
        history = [entry for entry in self.history() if entry != label] + [label]
        write_atomically(self.root / HISTORY, (json.dumps(history[-50:]) + "\n").encode())
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


def serving_bundle(state_dir: Path, configured: Path) -> Path:
    """The bundle to serve at start-up: the store's active model if there is one, else the configured bundle."""
    active = store_root(state_dir) / ACTIVE
    return active if active.is_symlink() and active.exists() else configured
