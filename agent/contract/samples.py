"""The line's images coming back: samples the agent stored, and the labels engineers give them.

The agent announces each stored sample (SampleRecord, with a small JPEG thumbnail) so a dashboard can
show it; an engineer's label (SampleLabel) comes back signed, like every command that changes what an
agent keeps, and the agent answers with a SampleLabelResult.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from .codec import Identifier, ModelLabel, Name, Record, Text, UnixTime
from .line import FailsafeCause, VerdictKind

SampleKind = Literal["reject", "failsafe", "close-call", "random"]
LabelKind = Literal["ok", "nok", "unsure"]
MAX_THUMBNAIL_CHARS = 48_000  # base64 of a ~36 KB JPEG


class SampleRecord(Record):
    """agent -> line: a frame the agent stored as a sample (why, what it decided, a thumbnail)."""

    MAX_BYTES: ClassVar[int] = 64 * 1024

    sample_id: Identifier
    agent_id: Name
    line: Name
    camera: Name
    seq: int = Field(ge=0)
    camera_frame_id: int = Field(-1, ge=-1)
    kind: SampleKind = Field(description="Why it was kept: every reject and failsafe, close calls, a random share.")
    verdict: VerdictKind
    cause: FailsafeCause | None = None
    score: float | None = None
    threshold: float
    model: ModelLabel
    capture_ts: UnixTime
    thumbnail_jpeg: Annotated[str, Field(max_length=MAX_THUMBNAIL_CHARS)] = Field(
        "", description="base64 JPEG of the model's view with the anomaly map, at most 48,000 characters."
    )


class SampleLabel(Record):
    """labeller -> agent: what a stored sample really shows. Signed like ModelCommand (agent/authority.py)."""

    MAX_BYTES: ClassVar[int] = 4096

    agent_id: Name
    sample_id: Identifier
    label: LabelKind
    defect_type: str = Field("", pattern=r"^[a-z0-9_-]{0,64}$", description="For nok: e.g. crack, scratch.")
    by: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="Who labelled it.")
    request_id: Identifier
    issued_ts: UnixTime
    nonce: Identifier
    key_id: str = Field("", pattern=r"^([0-9a-f]{16})?$")
    signature: str = Field("", max_length=200)

    def signed_bytes(self) -> bytes:
        """What the signature covers: this label's JSON without key_id and signature."""
        return self.model_copy(update={"key_id": "", "signature": ""}).encode()


class SampleLabelResult(Record):
    """agent -> labellers: whether a label was stored, and why not."""

    MAX_BYTES: ClassVar[int] = 4096

    agent_id: Name
    sample_id: Annotated[str, Field(max_length=64)]
    request_id: Annotated[str, Field(max_length=64)]
    outcome: Literal["stored", "refused"]
    reason: Text
    ts: UnixTime
