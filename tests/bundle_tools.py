"""Test helpers that make variants of a real bundle: another version, a broken canary, tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lineguard.agent.bundle import MANIFEST_FILE, SIGNATURE_FILE
from lineguard.agent.signing import load_private_key, sign


def bundle_variant(source: Path, dest: Path, signing_key: Path | None, **manifest_changes: Any) -> Path:
    """Copy a bundle, change top-level manifest keys (or golden scores via golden_scale), re-sign."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST_FILE).read_text())
    scale = manifest_changes.pop("golden_scale", None)
    if scale is not None:
        for golden in manifest["golden"]:
            golden["expected_score"] *= scale
    manifest.update(manifest_changes)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (dest / MANIFEST_FILE).write_bytes(data)
    (dest / SIGNATURE_FILE).unlink(missing_ok=True)
    if signing_key is not None:
        (dest / SIGNATURE_FILE).write_text(json.dumps(sign(data, load_private_key(signing_key))))
    return dest
