"""Signed commands: accepted once from a trusted key for this agent, refused when forged, stale or replayed."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lineguard.agent.authority import CommandRefused, CommandVerifier, sign_command
from lineguard.agent.contract import ModelCommand, SampleLabel

OPERATOR = Ed25519PrivateKey.generate()


def rollback(agent: str = "press-3", *, issued_ts: float | None = None) -> ModelCommand:
    request_id, nonce = ModelCommand.new_ids()
    issued = time.time() if issued_ts is None else issued_ts
    return ModelCommand(action="rollback", agent_id=agent, request_id=request_id, issued_ts=issued, nonce=nonce)


@pytest.fixture
def verifier(tmp_path):
    return CommandVerifier("press-3", [OPERATOR.public_key()], tmp_path / "nonces.json")


def test_a_signed_command_for_this_agent_is_accepted_once(verifier):
    command = sign_command(rollback(), OPERATOR)
    assert verifier.check(command) == command.key_id
    with pytest.raises(CommandRefused, match="used before: a replayed command"):
        verifier.check(command)


def test_a_replay_is_refused_after_the_agent_restarts(verifier, tmp_path):
    command = sign_command(rollback(), OPERATOR)
    verifier.check(command)
    restarted = CommandVerifier("press-3", [OPERATOR.public_key()], tmp_path / "nonces.json")
    with pytest.raises(CommandRefused, match="replayed"):
        restarted.check(command)


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (rollback(), "not signed"),
        (sign_command(rollback(), Ed25519PrivateKey.generate()), "does not trust"),
        (sign_command(rollback("press-4"), OPERATOR), "is for agent press-4"),
        (sign_command(rollback(issued_ts=time.time() - 3600), OPERATOR), "recorded command, or clocks out of step"),
        (sign_command(rollback(), OPERATOR).model_copy(update={"model": "brick@9"}), "does not match"),
        (sign_command(rollback(), OPERATOR).model_copy(update={"signature": "!!"}), "does not match"),
    ],
    ids=["unsigned", "untrusted", "other agent", "stale", "altered", "garbage signature"],
)
def test_forged_stale_and_foreign_commands_are_refused_with_the_reason(verifier, command, fragment):
    with pytest.raises(CommandRefused, match=fragment):
        verifier.check(command)


def test_labels_are_signed_and_checked_the_same_way(verifier):
    request_id, nonce = ModelCommand.new_ids()
    label = SampleLabel(
        agent_id="press-3",
        sample_id="s1",
        label="ok",
        by="anna",
        request_id=request_id,
        issued_ts=time.time(),
        nonce=nonce,
    )
    assert verifier.check(sign_command(label, OPERATOR))
