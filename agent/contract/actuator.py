"""What a reject actuator (lineguard-actuator) tells the line: its retained status, counts by reason, faults."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field

from .codec import Name, Record, Text, UnixTime

RejectReason = Literal["reject", "failsafe", "missing", "late", "unknown-model", "sequence-gap", "vision-fault"]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)


class ActuatorStatus(Record):
    """The actuator's retained status; its last will is this record with online false."""

    MAX_BYTES: ClassVar[int] = 16 * 1024

    actuator_id: Name
    line: Name
    online: bool
    state: Literal["ok", "vision-fault", "output-fault", "stopped"] = "ok"
    mode: Literal["time", "count"] = Field("time", description="How due points are found: capture time or a counter.")
    reason: Text = Field("", description="What is wrong, where state is not ok.")
    output: Annotated[str, Field(max_length=64)] = Field("", description="Output back end: modbus-coil, opcua, gpio...")
    agents: dict[Name, bool] = Field(default_factory=dict, max_length=256, description="Agent id -> seen online.")
    parts: int = Field(0, ge=0, description="Parts that reached the reject point since start.")
    pulses: int = Field(0, ge=0, description="Reject pulses fired since start.")
    rejects: dict[RejectReason, int] = Field(default_factory=dict, description="Rejected parts by reason.")
    late_pulses: int = Field(0, ge=0, description="Pulses not fired because their due point had passed.")
    late_verdicts: int = Field(0, ge=0, description="Verdicts that arrived after their part's due point.")
    unguarded: int = Field(
        0, ge=0, description="Parts past their due point before anything was known of them: no pulse; alarm raised."
    )
    bad_input: int = Field(
        0,
        ge=0,
        description="Messages refused: not the contract, unknown agent or camera, duplicate, replayed, retained.",
    )
    handshake_failures: int = Field(0, ge=0, description="PLC handshakes not echoed in time.")
    ts: UnixTime
