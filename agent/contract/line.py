"""What an agent tells the line: one Verdict per captured frame, heatmaps that pair with it, and its status."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, model_validator

from .codec import ModelLabel, Name, Part, Record, Text, UnixTime, decode_object

VerdictKind = Literal["accept", "reject", "failsafe"]

# Why a frame got `failsafe`, named after the component that failed. Closed: a subscriber can count by cause.
FailsafeCause = Literal[
    "engine-late",  # the engine answered, or would have, after the frame's deadline (overload)
    "engine-down",  # no answer from the engine by the deadline and the engine is not running
    "engine-error",  # the engine could not score the frame (runtime error, unusable input)
    "decision-restarted",  # the frame's record was lost with a decision process that died
    "capture-lost",  # the camera delivered a broken frame, or said it lost one (frame-id gap)
    "ring-full",  # no free ring slot: the engine or decision could not keep up
    "ring-missing",  # the frame's shared-memory ring is gone (deleted, capture restarting)
    "slot-overwritten",  # the frame's ring slot was reused before it was scored
    "model-unknown",  # the model that scored it has no manifest on this agent
    "score-invalid",  # the model produced no usable number (NaN), or a map the rule needed is missing
]
FAILSAFE_CAUSES: tuple[str, ...] = get_args(FailsafeCause)


class Latency(Part):
    """Where a frame's time went, in milliseconds; stages the frame did not pass through are absent (null)."""

    capture_to_engine: float | None = Field(None, ge=0)
    inference: float | None = Field(None, ge=0)
    engine_to_decision: float | None = Field(None, ge=0)
    total: float = Field(ge=0, description="Capture to publication.")


class Verdict(Record):
    """One frame's verdict. Key: (agent_id, camera, seq); QoS 1 may deliver it twice."""

    MAX_BYTES: ClassVar[int] = 4096

    agent_id: Name
    line: Name
    camera: Name
    seq: int = Field(ge=0, description="Per-camera sequence number; increases across restarts, never repeats.")
    camera_frame_id: int = Field(-1, ge=-1, description="The camera's own frame counter; -1 where unknown.")
    camera_timestamp_ns: int | None = Field(
        None, ge=0, description="The camera's own clock at exposure (GigE Vision), nanoseconds; null where none."
    )
    capture_ts: UnixTime = Field(description="When the agent received the frame.")
    decided_ts: UnixTime
    verdict: VerdictKind
    cause: FailsafeCause | None = Field(None, description="Set exactly when verdict is failsafe.")
    reason: Text
    score: float | None = Field(None, description="The model's image score; null for failsafe.")
    threshold: float
    model: ModelLabel
    latency_ms: Latency

    @model_validator(mode="after")
    def _cause_with_failsafe(self) -> Verdict:
        if (self.verdict == "failsafe") != (self.cause is not None):
            msg = f"cause must be set exactly when verdict is failsafe (verdict {self.verdict}, cause {self.cause})"
            raise ValueError(msg)
        return self

    @property
    def key(self) -> tuple[str, str, int]:
        return self.agent_id, self.camera, self.seq


class HeatmapInfo(Record):
    """The MQTT 5 user properties of a heatmap message: which verdict its image belongs to."""

    MAX_BYTES: ClassVar[int] = 1024

    agent_id: Name
    camera: Name
    seq: int = Field(ge=0)
    model: ModelLabel
    format: Literal["jpeg", "png"]

    def user_properties(self) -> list[tuple[str, str]]:
        return [(key, str(value)) for key, value in self.model_dump().items()]

    @classmethod
    def from_user_properties(cls, pairs: list[tuple[str, str]] | None) -> HeatmapInfo:
        """Read back what user_properties() wrote; ContractError for anything else."""
        values: dict[str, object] = {}
        for key, value in (pairs or [])[:16]:
            values[key[:32]] = int(value) if key in ("v", "seq") and value.isdigit() and len(value) < 20 else value
        return decode_object(cls, values)

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"


class Backend(Part):
    name: str = Field(max_length=32)
    detail: Text = Field(description="What was chosen and why the others were skipped.")


class CameraStatus(Part):
    model: ModelLabel | None = Field(
        None, description="The model that scores this camera (cameras may each have their own); null where unknown."
    )
    fps: float = Field(ge=0, description="Verdicts per second over the health window.")
    expected_fps: float | None = Field(None, ge=0, description="The rate it should deliver; null where unknown.")
    failsafe_share: float = Field(0.0, ge=0, le=1, description="Share of its verdicts that were failsafe.")
    failsafes: dict[FailsafeCause, int] = Field(default_factory=dict, description="Failsafes in the window by cause.")


class Health(Part):
    """What the line gets from this agent: ok, degraded (some frames fail or come slowly), failing."""

    state: Literal["ok", "degraded", "failing"]
    reasons: tuple[Text, ...] = Field((), max_length=32, description="Worst first; empty when ok.")


class AgentStatus(Record):
    """The agent's retained status; its last will is this record with online false."""

    MAX_BYTES: ClassVar[int] = 32 * 1024

    agent_id: Name
    line: Name
    online: bool
    health: Health | None = Field(None, description="Null in the last will and the stopped status.")
    model: ModelLabel | None = Field(
        None,
        description="The model scoring every camera, when the agent serves one model id; null when its cameras have "
        "models of their own (each camera's is in cameras.*.model).",
    )
    cameras: dict[Name, CameraStatus] = Field(default_factory=dict, max_length=64)
    queue_depth: int = Field(0, ge=0, description="Frames waiting for a verdict.")
    mqtt_queued: int = Field(0, ge=0, description="Messages held locally for the broker.")
    backend: Backend | None = None
    reason: Text = Field("", description="Why the agent is offline, where it is.")
    deadline_ms: float | None = Field(
        None, gt=0, description="decision.deadline_ms: every frame has its verdict this long after capture."
    )
    ts: UnixTime = Field(description="When this status was written (for the last will: when the agent connected).")

    def serving(self) -> tuple[str, ...]:
        """The models this agent serves, sorted: its one model, or each camera's where cameras have their own."""
        if self.model:
            return (self.model,)
        return tuple(sorted({camera.model for camera in self.cameras.values() if camera.model}))
