"""UiConfig: the dashboard's one pydantic-settings schema, from a TOML file plus LINEGUARD_UI_ environment overrides.

Precedence: explicit values > environment (LINEGUARD_UI_HTTP__PORT=8090, LINEGUARD_UI_MQTT__PASSWORD) > TOML
file > defaults. The broker section is the agent's MqttConfig. Validators do no I/O: the users file, the label
key and the broker are read at start-up, after validation.
"""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from lineguard.agent.config import ConfigError, MqttConfig, TomlSettings, load_settings

NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HttpConfig(_Section):
    host: str = Field(
        "127.0.0.1", description="Address the page listens on; 127.0.0.1 = this machine only (put a proxy in front)."
    )
    port: int = Field(8080, ge=1, le=65535, description="HTTP port of the page.")
    root_path: str = Field(
        "", pattern=r"^(/[A-Za-z0-9._~-]+)*$", description="URL prefix when a reverse proxy serves the page below /."
    )
    tls_cert: Path | None = Field(None, description="Certificate chain (PEM) to serve HTTPS directly; with tls_key.")
    tls_key: Path | None = Field(None, description="Private key (PEM) of tls_cert.")
    max_clients: int = Field(64, ge=1, le=10_000, description="Browsers following the live feed at once.")
    client_queue: int = Field(
        256, ge=8, le=100_000, description="Updates held for one slow browser before it is told to reload its view."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> HttpConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = "tls_cert and tls_key must be given together"
            raise ValueError(msg)
        return self


class StoreConfig(_Section):
    retention_days: float = Field(
        90.0, gt=0, le=3650, description="Verdict history, alarms, labels and pushes are kept this long, days."
    )
    images_per_camera: int = Field(
        500, ge=10, le=100_000, description="Reject heatmaps and sample thumbnails kept per camera (newest)."
    )
    flush_interval_ms: float = Field(200.0, gt=0, le=10_000, description="Longest wait before rows are written.")
    max_pending_rows: int = Field(
        200_000, ge=1000, description="Rows waiting for the writer; past this new rows are dropped and counted."
    )


class AlarmConfig(_Section):
    status_silence_s: float = Field(
        10.0, gt=0, description="An online agent whose status (every 2 s) is this old counts as offline."
    )
    camera_silence_s: float = Field(
        10.0, gt=0, description="A camera of an online agent without a verdict this long is down."
    )
    failsafe_window_s: float = Field(10.0, gt=0, description="Window of the failsafe-burst rule, seconds.")
    failsafe_burst: int = Field(5, ge=1, description="This many failsafe verdicts of one camera in the window: alarm.")
    queue_growing_samples: int = Field(
        3, ge=2, description="Consecutive statuses whose mqtt_queued keeps rising before 'MQTT queue growing'."
    )
    queue_min_messages: int = Field(50, ge=1, description="A rising MQTT queue alarms only from this many messages.")
    queue_max_messages: int = Field(5000, ge=1, description="An MQTT queue this long alarms whether it rises or not.")


class AuthConfig(_Section):
    users_file: Path | None = Field(
        None, description="Users who may label and acknowledge: `name:scrypt$...` lines (lineguard-ui add-user)."
    )
    proxy_header: str = Field(
        "",
        pattern=r"^([A-Za-z0-9-]{1,64})?$",
        description="Trust this header (e.g. X-Forwarded-User) as the user name, from trusted_proxies only.",
    )
    trusted_proxies: tuple[str, ...] = Field(
        ("127.0.0.1", "::1"), description="Client addresses whose proxy_header is believed."
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="A login lasts this long, hours.")
    cookie_secure: bool = Field(
        False, description="Mark the session cookie Secure (HTTPS only): set it behind an HTTPS proxy."
    )
    max_login_failures: int = Field(
        10, ge=1, description="Failed logins per client address in 10 minutes before it must wait."
    )


class UiConfig(TomlSettings):
    """The dashboard's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LINEGUARD_UI_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    line: str = Field("+", pattern=r"^(\+|[A-Za-z0-9_-]{1,64})$", description="The line to follow; + = every line.")
    state_dir: Path = Field(
        Path("/var/lib/lineguard-ui"), description="Folder for the SQLite history and the session key."
    )
    label_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, lineguard-deploy keygen) that signs labels; none = no labelling."
    )
    http: HttpConfig = Field(default_factory=HttpConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    alarms: AlarmConfig = Field(default_factory=AlarmConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @property
    def client_id(self) -> str:
        """The broker session's id: persistent, so verdicts published while the page is down still arrive."""
        return self.mqtt.client_id or f"lineguard-ui-{socket.gethostname()[:40]}"

    @property
    def database(self) -> Path:
        return self.state_dir / "dashboard.sqlite3"


def load_config(path: Path | None) -> UiConfig:
    """Read and validate the configuration; ConfigError lists every problem as `key.path: message`."""
    return load_settings(UiConfig, path, file_name="ui.toml")


__all__ = ["AlarmConfig", "AuthConfig", "ConfigError", "HttpConfig", "StoreConfig", "UiConfig", "load_config"]
