"""DeployConfig: the operator's broker settings, one pydantic-settings schema like the agent's.

Precedence: command-line flags > LINEGUARD_ environment variables (LINEGUARD_MQTT__HOST,
LINEGUARD_MQTT__PASSWORD, LINEGUARD_OPERATOR_KEY) > defaults. The password is read only from the
environment, never from a flag (a flag shows in `ps` and in shell history).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from lineguard.agent.config import ConfigError, MqttConfig, format_errors


class DeployConfig(BaseSettings):
    """What `lineguard-deploy` needs: the broker, and the operator key that signs commands."""

    model_config = SettingsConfigDict(env_prefix="LINEGUARD_", env_nested_delimiter="__", extra="ignore", frozen=True)

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    operator_key: Path | None = Field(
        None, description="Ed25519 private key (PEM) that signs model commands; agents trust its .pub."
    )


def load_deploy_config(*, mqtt: dict[str, Any], operator_key: Path | None) -> DeployConfig:
    """Flags (None: not given) over the environment; ConfigError names each bad key."""
    values: dict[str, Any] = {"mqtt": {key: value for key, value in mqtt.items() if value is not None}}
    if operator_key is not None:
        values["operator_key"] = operator_key
    try:
        return DeployConfig(**values)
    except ValidationError as error:
        raise ConfigError(format_errors(error, None)) from error
