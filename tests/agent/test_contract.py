"""The MQTT contract: records round-trip, anything malformed is refused with ContractError and nothing else,
topics follow one table, the JSON Schema files match the code, and nobody else spells a topic or a key."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lineguard.agent.contract import (
    ANY,
    CHANNELS,
    RECORDS,
    ActuatorStatus,
    AgentStatus,
    Backend,
    CameraStatus,
    ContractError,
    HeatmapInfo,
    Latency,
    ModelCommand,
    ModelEvent,
    Record,
    SampleLabel,
    SampleLabelResult,
    SampleRecord,
    ShadowResult,
    Topics,
    TransferAck,
    TransferMeta,
    Verdict,
    decode,
)
from lineguard.agent.contract.schema_files import SCHEMA_DIR, differences

ROOT = Path(__file__).resolve().parents[2]


def examples() -> dict[type[Record], Record]:
    """One realistic record of every type."""
    return {
        Verdict: Verdict(
            agent_id="press-3",
            line="line-1",
            camera="top",
            seq=1042,
            camera_frame_id=17,
            camera_timestamp_ns=9_876_543_210,
            capture_ts=1_764_000_000.25,
            decided_ts=1_764_000_000.31,
            verdict="failsafe",
            cause="engine-late",
            reason="no score within the 250 ms deadline: the engine is running but behind",
            score=None,
            threshold=0.42,
            model="brick@1.0.0",
            latency_ms=Latency(total=251.0),
        ),
        HeatmapInfo: HeatmapInfo(agent_id="press-3", camera="top", seq=1042, model="brick@1.0.0", format="jpeg"),
        AgentStatus: AgentStatus(
            agent_id="press-3",
            line="line-1",
            online=True,
            model="brick@1.0.0",
            cameras={"top": CameraStatus(fps=9.8)},
            queue_depth=2,
            mqtt_queued=0,
            backend=Backend(name="onnxruntime-cpu", detail="skipped tensorrt: no engine"),
            ts=1_764_000_000.0,
        ),
        ModelEvent: ModelEvent(
            agent_id="press-3",
            action="push",
            request_id="0123456789abcdef",
            outcome="accepted",
            model="brick@1.1.0",
            serving="brick@1.1.0",
            reason="brick@1.1.0 is serving: canary passed",
            shadow=ShadowResult(frames=120, serving_reject_rate=0.05, candidate_reject_rate=0.03),
            ts=1_764_000_000.0,
        ),
        ModelCommand: ModelCommand(
            action="rollback",
            agent_id="press-3",
            request_id="r1",
            issued_ts=1_764_000_000.0,
            nonce="n1",
            key_id="0123456789abcdef",
            signature="c2lnbmF0dXJl",
        ),
        TransferMeta: TransferMeta.for_archive(b"x" * 5000, model_id="brick", model_version="1.1.0", chunk_bytes=2048),
        TransferAck: TransferAck(transfer_id="t1", state="receiving", received=1, chunk_count=3, missing=((1, 3),)),
        SampleRecord: SampleRecord(
            sample_id="s-1042",
            agent_id="press-3",
            line="line-1",
            camera="top",
            seq=1042,
            kind="close-call",
            verdict="accept",
            score=0.40,
            threshold=0.42,
            model="brick@1.0.0",
            capture_ts=1_764_000_000.25,
            thumbnail_jpeg="/9j/4AAQ",
        ),
        SampleLabel: SampleLabel(
            agent_id="press-3",
            sample_id="s-1042",
            label="nok",
            defect_type="crack",
            by="anna",
            request_id="r2",
            issued_ts=1_764_000_100.0,
            nonce="n2",
        ),
        ActuatorStatus: ActuatorStatus(
            actuator_id="gate-1",
            line="line-1",
            online=True,
            output="modbus-coil",
            agents={"press-3": True},
            parts=120,
            pulses=7,
            rejects={"reject": 6, "failsafe": 1},
            late_verdicts=1,
            bad_input=2,
            ts=1_764_000_000.0,
        ),
        SampleLabelResult: SampleLabelResult(
            agent_id="press-3", sample_id="s-1042", request_id="r2", outcome="stored", reason="", ts=1_764_000_101.0
        ),
    }


def test_every_record_type_has_an_example_here():
    assert set(examples()) == set(RECORDS)


@pytest.mark.parametrize("record_type", RECORDS, ids=lambda t: t.__name__)
def test_every_record_survives_a_round_trip_with_its_schema_version(record_type):
    record = examples()[record_type]
    data = record.encode()
    assert json.loads(data)["v"] == 1
    assert decode(record_type, data) == record


BAD_VERDICTS = [
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "Verdict payload refused"),
    (b"{}", "agent_id: missing"),
    (b"null", "Verdict payload refused"),
    (b"[" * 100_000 + b"]" * 100_000, "payload is 200000 bytes"),
    (b"[" * 1000 + b"]" * 1000, "recursion limit"),
]


@pytest.mark.parametrize(("payload", "fragment"), BAD_VERDICTS, ids=range(len(BAD_VERDICTS)))
def test_malformed_bytes_are_refused_with_the_reason(payload, fragment):
    with pytest.raises(ContractError, match=re.escape(fragment)):
        decode(Verdict, payload)


def with_change(record: Record, **changes: object) -> bytes:
    body = json.loads(record.encode())
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"score": "NaN"}, "score"),
        ({"seq": "12"}, "seq: Input should be a valid integer"),
        ({"seq": True}, "seq: Input should be a valid integer"),
        ({"seq": 1.5}, "seq: Input should be a valid integer"),
        ({"verdict": "maybe"}, "verdict"),
        ({"cause": "gremlins"}, "cause"),
        ({"cause": None}, "cause must be set exactly when verdict is failsafe"),
        ({"camera": "top/../side"}, "camera: String should match pattern"),
        ({"reason": "x" * 501}, "reason: String should have at most 500 characters"),
        ({"extra": 1}, "extra: unknown key"),
        ({"v": 2}, "schema version 2; this reader knows 1"),
    ],
)
def test_wrong_types_and_values_are_refused_naming_the_key(changes, fragment):
    with pytest.raises(ContractError, match=re.escape(fragment)):
        decode(Verdict, with_change(examples()[Verdict], **changes))


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(token):
    payload = examples()[Verdict].encode().replace(b'"threshold":0.42', b'"threshold":' + token)
    with pytest.raises(ContractError, match="threshold"):
        decode(Verdict, payload)


def test_a_refusal_never_echoes_more_than_a_few_hundred_characters_of_the_input():
    payload = with_change(examples()[Verdict], camera="a" * 5000)
    with pytest.raises(ContractError) as refused:
        decode(Verdict, payload)
    assert len(str(refused.value)) <= 400


def test_an_ack_cannot_ask_for_chunks_past_the_cap_or_backwards_ranges():
    for missing in ([[0, 10**9]], [[5, 2]], [[-1, 2]]):
        with pytest.raises(ContractError, match="missing"):
            decode(
                TransferAck, json.dumps({"v": 1, "transfer_id": "t", "state": "receiving", "missing": missing}).encode()
            )


def test_heatmap_info_travels_as_user_properties():
    info = examples()[HeatmapInfo]
    assert isinstance(info, HeatmapInfo)
    assert HeatmapInfo.from_user_properties(info.user_properties()) == info
    with pytest.raises(ContractError, match="seq"):
        HeatmapInfo.from_user_properties([*info.user_properties()[:3], ("seq", "-1"), *info.user_properties()[4:]])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(RECORDS), st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_contract_errors(record_type, payload):
    with contextlib.suppress(ContractError):
        decode(record_type, payload)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(RECORDS), json_values)
def test_arbitrary_json_raises_only_contract_errors(record_type, value):
    try:
        payload = json.dumps(value).encode()
    except ValueError:
        return
    with contextlib.suppress(ContractError):
        decode(record_type, payload)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(RECORDS), st.data())
def test_a_valid_record_with_any_one_key_replaced_raises_only_contract_errors(record_type, data):
    body = json.loads(examples()[record_type].encode())
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(json_values)
    payload = json.dumps(body).encode()  # NaN and Infinity come out as bare tokens, which decode must refuse
    with contextlib.suppress(ContractError):
        decode(record_type, payload)


# -- topics -----------------------------------------------------------------------------------------------------


def test_topics_follow_the_table():
    topics = Topics("lineguard")
    assert topics.verdict("line-1", "press-3", "top") == "lineguard/line-1/press-3/top/verdict"
    assert topics.heatmap(ANY, ANY, ANY) == "lineguard/+/+/+/heatmap"
    assert topics.status("press-3") == "lineguard/press-3/status"
    assert topics.push("press-3", "abc").chunk(4) == "lineguard/press-3/model/push/abc/chunk/4"
    assert Topics("plant/a").verdict("l", "x", "c") == "plant/a/l/x/c/verdict"
    match = topics.match("lineguard/line-1/press-3/top/verdict")
    assert match is not None and match.channel.name == "verdict"
    assert match.levels == {"line": "line-1", "agent": "press-3", "camera": "top"}
    assert topics.match("lineguard/press-3/model/push/abc/chunk/x") is None
    assert topics.match("other/press-3/status") is None


@pytest.mark.parametrize("bad", ["line/1", "", "a+", "#", "x" * 65])
def test_a_name_that_is_no_topic_level_is_refused(bad):
    with pytest.raises(ContractError, match="topic level"):
        Topics("lineguard").verdict(bad, "press-3", "top")


@pytest.mark.parametrize("bad", ["", "a//b", "/a", "a/", "a/+", "a/#"])
def test_a_bad_prefix_is_refused(bad):
    with pytest.raises(ContractError, match="prefix"):
        Topics(bad)


# -- published contract -----------------------------------------------------------------------------------------


def test_the_json_schema_files_match_the_code():
    assert differences() == [], "run: python -m lineguard.agent.contract.schema_files --write"
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")) == sorted(
        f"{r.__name__}.schema.json" for r in RECORDS
    )


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_the_readme_lists_every_channel_with_its_qos_and_retain_flag():
    section = readme_section("For subscribers")
    for channel in CHANNELS.values():
        row = next((line for line in section.splitlines() if f"`<prefix>/{channel.pattern}`" in line), None)
        assert row is not None, f"README 'For subscribers' has no row for {channel.pattern}"
        cells = [cell.strip() for cell in row.split("|")]
        assert str(channel.qos) in cells and ("yes" if channel.retained else "no") in cells, row


def test_every_example_payload_in_the_readme_decodes_as_its_record():
    section = readme_section("For subscribers")
    found = re.findall(r"`(\w+)` example:\n\n```json\n(.*?)\n```", section, flags=re.DOTALL)
    by_name = {record.__name__: record for record in RECORDS}
    assert {name for name, _ in found} >= {"Verdict", "AgentStatus", "ModelEvent", "ModelCommand"}
    for name, text in found:
        decode(by_name[name], text.encode())


# -- nobody else spells the contract ------------------------------------------------------------------------------

TOPIC_LITERAL = re.compile(r"""["'][^"'\n]*/(verdict|heatmap|status|model/(events|command|push))\b[^"'\n]*["']""")
MQTT_FILES = re.compile(r"paho|lineguard\.agent\.mqtt|from \.+mqtt|mqtt_subscriber|contract")


def contract_keys() -> set[str]:
    keys: set[str] = set()
    for record in RECORDS:
        keys |= set(record.model_fields)
    return keys - {"v"}


def python_files() -> list[Path]:
    folders = ("agent", "deploy", "scripts", "bench", "tests", "actuator", "ui")
    return [
        path
        for folder in folders
        if (ROOT / folder).is_dir()
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "contract" not in path.parts and path.name != "test_contract.py"
    ]


def test_no_topic_string_is_spelled_outside_the_contract():
    offenders = []
    for path in python_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if TOPIC_LITERAL.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "build topics with lineguard.agent.contract.Topics:\n" + "\n".join(offenders)


PAYLOAD_NAMES = r"(v|verdict|verdicts|payload|status|event|ack|meta|command|body|record|message|answer)"


def test_no_payload_key_is_spelled_outside_the_contract_in_code_that_talks_mqtt():
    keys = "|".join(sorted(contract_keys()))
    subscript = re.compile(rf"""\b{PAYLOAD_NAMES}(\[[^\]]*\])*\[\s*["']({keys})["']\s*\]|\.get\(\s*["']({keys})["']""")
    parse = re.compile(r"json\.loads\([^)]*(payload|message)")
    offenders = []
    for path in python_files():
        text = path.read_text()
        if not MQTT_FILES.search(text):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if subscript.search(line) or parse.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "decode payloads into contract records:\n" + "\n".join(offenders)
