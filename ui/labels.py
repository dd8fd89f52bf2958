"""Labels from engineers to the agents' sample stores: a SampleLabel signed with the dashboard's labeller key.

The dashboard signs with its own Ed25519 key (`label_key`, made with `lineguard-deploy keygen`); agents trust
its public half for labels only. The label is stored here when it is sent, and the agent's SampleLabelResult
(stored or refused, and why) is recorded against it when it comes back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lineguard.agent.authority import sign_command
from lineguard.agent.contract import LabelKind, SampleLabel, SampleLabelResult
from lineguard.agent.signing import KeyFileError, key_id, load_private_key

from .store import GalleryEntry, LabelRow, Store

log = logging.getLogger(__name__)

Send = Callable[[str, bytes], None]  # agent id, encoded SampleLabel; raises LabelRefused when it cannot go out


class LabelRefused(Exception):
    """A label cannot be sent: no labeller key, no sample id, a bad defect type, or the broker is away."""


class Labeller:
    """Signs, sends and records labels; `key_path` None means labelling is off (the page says so)."""

    def __init__(self, key_path: Path | None, store: Store, send: Send) -> None:
        self._key = None
        if key_path is not None:
            try:
                self._key = load_private_key(key_path)
            except KeyFileError as error:
                msg = f"label_key: {error}; make one with `lineguard-deploy keygen {key_path}`"
                raise LabelRefused(msg) from error
            log.info("labels are signed with key %s (%s)", key_id(self._key.public_key()), key_path)
        self._store = store
        self._send = send

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def label(self, entry: GalleryEntry, label: LabelKind, defect_type: str, by: str) -> LabelRow:
        """Sign and send a label for the gallery entry's sample; the stored row (outcome "sent")."""
        if self._key is None:
            msg = "labelling is off: set label_key in the dashboard's config to a labeller key agents trust"
            raise LabelRefused(msg)
        if not entry.sample_id:
            msg = (
                f"{entry.agent_id}/{entry.camera} seq {entry.seq} is not in the agent's sample store "
                "(no sample record arrived for it), so there is nothing to label"
            )
            raise LabelRefused(msg)
        request_id, nonce = uuid.uuid4().hex[:16], uuid.uuid4().hex
        try:
            unsigned = SampleLabel(
                agent_id=entry.agent_id,
                sample_id=entry.sample_id,
                label=label,
                defect_type=defect_type if label == "nok" else "",
                by=by,
                request_id=request_id,
                issued_ts=time.time(),
                nonce=nonce,
            )
        except ValueError as error:  # pydantic's ValidationError: a defect type outside [a-z0-9_-]
            msg = f"label refused: {str(error).splitlines()[-1][:200]}"
            raise LabelRefused(msg) from error
        signed = sign_command(unsigned, self._key)
        self._send(entry.agent_id, signed.encode())
        row = LabelRow(
            request_id=request_id,
            agent_id=entry.agent_id,
            sample_id=entry.sample_id,
            camera=entry.camera,
            seq=entry.seq,
            label=label,
            defect_type=signed.defect_type,
            by=by,
            issued_ts=signed.issued_ts,
        )
        self._store.save_label(row, signed)
        log.info(
            "label %s for %s sample %s sent by %s (request %s)", label, entry.agent_id, entry.sample_id, by, request_id
        )
        return row

    def result(self, answer: SampleLabelResult) -> LabelRow | None:
        """Record an agent's answer; None when it answers a label another labeller sent."""
        row = self._store.label_result(answer.request_id, answer.agent_id, answer.outcome, answer.reason, answer.ts)
        if row is not None and answer.outcome == "refused":
            log.warning("agent %s refused label %s: %s", answer.agent_id, answer.request_id, answer.reason[:200])
        return row
