"""Every MQTT topic Lineguard uses, with its QoS, retain flag, direction and payload, in one table.

Topics are built and parsed only here. Camera-level traffic sits under the line, so one wildcard
subscription follows a whole line (`<prefix>/<line>/#`); agent-level traffic sits under the agent,
so a broker ACL can give each agent (`%u`) and operator exactly the topics it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .codec import NAME_PATTERN, ContractError

ANY = "+"  # a single-level wildcard, accepted wherever a subscription filter is built
_LEVEL = re.compile(NAME_PATTERN)
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True, slots=True)
class Channel:
    """One kind of message: where it goes, how it is delivered, and what it carries."""

    name: str
    pattern: str  # levels after the prefix, {placeholders} for names
    payload: str  # the record (agent/contract) or "raw bytes: ..."
    qos: int
    retained: bool
    direction: str


CHANNELS: dict[str, Channel] = {
    channel.name: channel
    for channel in (
        Channel("verdict", "{line}/{agent}/{camera}/verdict", "Verdict", 1, False, "agent -> line"),
        Channel(
            "heatmap",
            "{line}/{agent}/{camera}/heatmap",
            "raw bytes: JPEG or PNG; MQTT 5 user properties HeatmapInfo",
            0,
            False,
            "agent -> line",
        ),
        Channel("sample", "{line}/{agent}/{camera}/sample", "SampleRecord", 1, False, "agent -> line"),
        Channel("status", "{agent}/status", "AgentStatus", 1, True, "agent -> anyone (last will: online false)"),
        Channel("model_events", "{agent}/model/events", "ModelEvent", 1, False, "agent -> operators"),
        Channel("model_command", "{agent}/model/command", "ModelCommand", 1, False, "operator -> agent"),
        Channel("push_meta", "{agent}/model/push/{transfer}/meta", "TransferMeta", 1, False, "operator -> agent"),
        Channel(
            "push_chunk",
            "{agent}/model/push/{transfer}/chunk/{index}",
            "raw bytes: one archive chunk",
            1,
            False,
            "operator -> agent",
        ),
        Channel("push_ack", "{agent}/model/push/{transfer}/ack", "TransferAck", 1, False, "agent -> operator"),
        Channel("sample_label", "{agent}/samples/label", "SampleLabel", 1, False, "labeller -> agent"),
        Channel("sample_events", "{agent}/samples/events", "SampleLabelResult", 1, False, "agent -> labellers"),
        Channel(
            "actuator_status",
            "actuators/{actuator}/status",
            "ActuatorStatus",
            1,
            True,
            "actuator -> anyone (last will: online false)",
        ),
        Channel(
            "actuator_probe",
            "actuators/{actuator}/probe",
            "raw bytes: a latency probe the actuator sends itself at start-up",
            1,
            False,
            "actuator -> itself",
        ),
    )
}


def check_prefix(prefix: str) -> str:
    """`prefix` if it can start every topic (levels of letters, digits, '_' or '-'); ContractError otherwise."""
    if not _PREFIX.fullmatch(prefix):
        msg = f"MQTT topic prefix {prefix!r} must be levels of letters, digits, '_' or '-', without wildcards or empty levels"
        raise ContractError(msg)
    return prefix


_LEVEL_ROLES = {
    "line": "line",
    "agent": "agent id",
    "camera": "camera",
    "transfer": "transfer id",
    "index": "chunk index",
    "actuator": "actuator id",
}
_LEVEL_PATTERNS = {
    "line": _LEVEL,
    "agent": _LEVEL,
    "camera": _LEVEL,
    "actuator": _LEVEL,
    "transfer": re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    "index": re.compile(r"^[0-9]{1,9}$"),
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _level(kind: str, value: str, *, wildcard: bool) -> str:
    if (wildcard and value == ANY) or _LEVEL_PATTERNS[kind].fullmatch(value):
        return value
    msg = f"{_LEVEL_ROLES[kind]} {value[:80]!r} cannot be an MQTT topic level: use letters, digits, '_' or '-'"
    raise ContractError(msg)


@dataclass(frozen=True, slots=True)
class TopicMatch:
    """What a received topic is: its channel and the names in its levels."""

    channel: Channel
    levels: dict[str, str]


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names and subscription filters under one prefix; a `+` argument makes a filter of that level."""

    prefix: str

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    def topic(self, channel: str, **levels: str | int) -> str:
        """The topic (or, with `+` levels, the filter) of `channel`; ContractError for a name that is no level."""
        pattern = CHANNELS[channel].pattern
        names = set(_PLACEHOLDER.findall(pattern))
        if names != set(levels):
            msg = f"channel {channel} needs levels {sorted(names)}, got {sorted(levels)}"
            raise ContractError(msg)
        checked = {key: _level(key, str(value), wildcard=True) for key, value in levels.items()}
        return f"{self.prefix}/{pattern.format(**checked)}"

    def verdict(self, line: str, agent: str, camera: str) -> str:
        return self.topic("verdict", line=line, agent=agent, camera=camera)

    def heatmap(self, line: str, agent: str, camera: str) -> str:
        return self.topic("heatmap", line=line, agent=agent, camera=camera)

    def sample(self, line: str, agent: str, camera: str) -> str:
        return self.topic("sample", line=line, agent=agent, camera=camera)

    def sample_label(self, agent: str) -> str:
        return self.topic("sample_label", agent=agent)

    def sample_events(self, agent: str) -> str:
        return self.topic("sample_events", agent=agent)

    def actuator_status(self, actuator: str) -> str:
        return self.topic("actuator_status", actuator=actuator)

    def actuator_probe(self, actuator: str) -> str:
        return self.topic("actuator_probe", actuator=actuator)

    def status(self, agent: str) -> str:
        return self.topic("status", agent=agent)

    def model_events(self, agent: str) -> str:
        return self.topic("model_events", agent=agent)

    def model_command(self, agent: str) -> str:
        return self.topic("model_command", agent=agent)

    def push(self, agent: str, transfer: str) -> PushTopics:
        """The topics of one transfer (`transfer` may be `+`: the receiver's subscriptions)."""
        return PushTopics(self, agent, transfer)

    def match(self, topic: str) -> TopicMatch | None:
        """The channel and level names of a received topic under this prefix; None for any other topic."""
        if not topic.startswith(self.prefix + "/"):
            return None
        levels = topic[len(self.prefix) + 1 :].split("/")
        for channel in CHANNELS.values():
            found = _match_levels(channel.pattern.split("/"), levels)
            if found is not None:
                return TopicMatch(channel, found)
        return None


def _match_levels(pattern: list[str], levels: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(levels):
        return None
    found: dict[str, str] = {}
    for want, got in zip(pattern, levels, strict=True):
        placeholder = _PLACEHOLDER.fullmatch(want)
        if placeholder is None:
            if want != got:
                return None
        elif _LEVEL_PATTERNS[placeholder.group(1)].fullmatch(got):
            found[placeholder.group(1)] = got
        else:
            return None
    return found


@dataclass(frozen=True, slots=True)
class PushTopics:
    """The topics of one bundle transfer to one agent."""

    topics: Topics
    agent: str
    transfer: str

    @property
    def meta(self) -> str:
        return self.topics.topic("push_meta", agent=self.agent, transfer=self.transfer)

    @property
    def ack(self) -> str:
        return self.topics.topic("push_ack", agent=self.agent, transfer=self.transfer)

    def chunk(self, index: int | str) -> str:
        return self.topics.topic("push_chunk", agent=self.agent, transfer=self.transfer, index=index)
