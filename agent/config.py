"""AgentConfig: one pydantic-settings schema, from a TOML file plus LINEGUARD_ environment overrides.

Precedence: explicit values > environment (LINEGUARD_MQTT__PORT=1884) > TOML file > defaults.
Validators do no I/O; devices, brokers and bundles are checked at start-up, after validation.
Every field has a unit in its name where it has one, and a description (shown by check-config).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Jetson JetPack 6)
    import tomli as tomllib


class ConfigError(Exception):
    """The configuration is unreadable or invalid; the message lists each bad key and the fix."""


MODEL_ID_PATTERN = r"^([A-Za-z0-9._-]{1,128})?$"  # a manifest's model_id, or empty


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoiConfig(_Section):
    x: int = Field(0, ge=0, description="Left edge of the region of interest in camera pixels.")
    y: int = Field(0, ge=0, description="Top edge of the region of interest in camera pixels.")
    width: int = Field(0, ge=0, description="ROI width in pixels; 0 = to the right edge of the frame.")
    height: int = Field(0, ge=0, description="ROI height in pixels; 0 = to the bottom edge of the frame.")


class CameraConfig(_Section):
    name: str = Field("cam0", pattern=r"^[A-Za-z0-9_-]+$", description="Camera name, used in MQTT topics.")
    source: Literal["gige", "usb", "video", "rtsp", "folder"] = Field("folder", description="Where frames come from.")
    address: str = Field(
        "",
        description="gige: camera id or IP (empty = first found); usb: device index or /dev/videoN; "
        "video/rtsp: file path or URL; folder: directory of images.",
    )
    width_px: int = Field(0, ge=0, description="Frame width to request from the camera; 0 = the camera's current.")
    height_px: int = Field(0, ge=0, description="Frame height to request; 0 = the camera's current.")
    pixel_format: Literal["mono8", "rgb8", "bgr8"] = Field("mono8", description="Pixel format delivered to the ring.")
    exposure_us: float | None = Field(None, gt=0, description="Exposure time in microseconds (gige/usb); None = leave.")
    gain_db: float | None = Field(None, ge=0, description="Analogue gain in dB (gige); None = leave as is.")
    trigger: Literal["free-run", "software", "hardware"] = Field("free-run", description="Acquisition trigger mode.")
    fps: float = Field(10.0, gt=0, description="folder/video replay rate, frames per second.")
    acquisition_fps: float | None = Field(
        None, gt=0, description="gige, free-run: the frame rate to set on the camera; None = leave the camera's."
    )
    loop: bool = Field(False, description="folder/video: start again at the end instead of stopping.")
    expected_fps: float | None = Field(
        None,
        ge=0,
        description="Frames per second this camera should deliver, for the health state; None = fps for "
        "folder/video replay, acquisition_fps for a free-running GigE camera, else unchecked.",
    )
    roi: RoiConfig = Field(default_factory=RoiConfig, description="Region of the frame the model sees.")
    model: str = Field(
        "",
        pattern=MODEL_ID_PATTERN,
        description="The id of the model (an entry of [[models]]) that scores this camera; empty = the one model "
        "of engine.bundle (only when no [[models]] are configured).",
    )
    reconnect_initial_s: float = Field(0.5, gt=0, description="First wait before reconnecting a lost camera.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Longest wait between reconnect attempts.")


class ModelConfig(_Section):
    """One model the agent serves, for the cameras that name its id (cameras[].model)."""

    id: str = Field(
        pattern=MODEL_ID_PATTERN.replace(")?$", ")$"),
        description="The model id, as in its bundle's manifest; pushes of this id swap only its cameras.",
    )
    bundle: Path = Field(description="Bundle directory to serve at the first start (later: the model store's).")
    threshold: float | None = Field(
        None, description="Override this model's calibrated threshold (every version of it); None = the bundle's."
    )


class RingConfig(_Section):
    slots: int = Field(16, ge=2, le=1024, description="Frame slots in the shared-memory ring per camera.")


class EngineConfig(_Section):
    bundle: Path = Field(Path("model-store/active"), description="Model bundle directory to serve at start-up.")
    trusted_keys: tuple[Path, ...] = Field((), description="Public keys (.pub) whose signatures are accepted.")
    require_signature: bool = Field(True, description="Refuse unsigned bundles (turn off only on a bench).")
    backend: Literal["auto", "tensorrt", "cuda", "cpu"] = Field(
        "auto",
        description="Inference back end: tensorrt = the bundle's TensorRT engine for this GPU; cuda, cpu = ONNX "
        "Runtime; auto = the first of those three that works.",
    )
    max_batch: int = Field(
        1, ge=1, le=64, description="Largest micro-batch of frames per inference (1 on CPUs; raise on GPUs)."
    )
    batch_wait_ms: float = Field(
        0.0, ge=0, description="Longest wait for a micro-batch to fill; 0 = batch only frames already waiting."
    )
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = runtime default.")
    cuda_graph: bool = Field(
        False, description="TensorRT back end: replay each batch size as a captured CUDA graph (less launch overhead)."
    )
    gpu_preprocess: bool = Field(
        True,
        description="TensorRT back end: copy only each frame's ROI from its ring slot to the GPU and convert and "
        "resize it there (a small engine built in the background on first use, cached in <state_dir>/engines); "
        "off = OpenCV on the CPU.",
    )
    shadow_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Before a swap, score live frames with both models this long and report the "
        "predicted reject-rate change (doubles inference meanwhile); 0 = golden-image canary only.",
    )
    canary_rtol: float = Field(
        1e-3, gt=0, lt=1, description="Golden images must score within this relative difference of the trainer's."
    )


class DecisionConfig(_Section):
    threshold: float | None = Field(
        None,
        description="Override the bundle's calibrated threshold; None = use it (with [[models]]: models.threshold).",
    )
    min_defect_area_px: int = Field(0, ge=0, description="Reject only if this many map pixels reach the threshold.")
    deadline_ms: float = Field(
        250.0, gt=0, description="A frame without a score this long after capture gets failsafe."
    )
    heatmap: Literal["none", "rejects", "all", "every-nth"] = Field(
        "rejects", description="Which frames publish a heatmap."
    )
    heatmap_every_n: int = Field(10, ge=1, description="With heatmap = every-nth: publish every Nth frame.")
    heatmap_format: Literal["jpeg", "png"] = Field("jpeg", description="Heatmap image encoding.")
    health_window_s: float = Field(
        10.0, ge=1, le=3600, description="The health state (status topic, metrics) looks at this many seconds."
    )


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS).")
    client_id: str = Field("", description="MQTT client id; empty = lineguard-<agent id>.")
    username: str = Field("", description="Broker user name; empty = anonymous.")
    password: SecretStr = Field(
        SecretStr(""), description="Broker password; prefer LINEGUARD_MQTT__PASSWORD from an environment file."
    )
    tls_ca: Path | None = Field(
        None, description="CA certificate (PEM) that signed the broker's certificate; enables TLS."
    )
    tls_cert: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    tls_key: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    keepalive_s: int = Field(10, ge=1, le=65535, description="MQTT keepalive; the last will fires after ~1.5x this.")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of verdict messages.")
    max_queued: int = Field(100_000, ge=100, description="Verdicts held locally while the broker is away.")
    topic_prefix: str = Field("lineguard", pattern=r"^[A-Za-z0-9_/-]+$", description="First level of every topic.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> MqttConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = "tls_cert and tls_key must be given together for mutual TLS"
            raise ValueError(msg)
        return self


class RolloutConfig(_Section):
    operator_keys: tuple[Path, ...] = Field(
        (),
        description="Public keys (.pub) of operators whose signed pushes and commands this agent accepts; "
        "none = every push and command over MQTT is refused.",
    )
    command_max_age_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="A signed command older (or newer) than this by the agent's clock is refused.",
    )
    staging_dir: Path | None = Field(
        None, description="Where pushed bundles are staged; None = <state_dir>/staging. Best on its own file system."
    )
    staging_max_bytes: int = Field(
        4 * 2**30, ge=2**20, description="Bytes all staged transfers may take together (allocated, not sparse)."
    )
    staging_reserve_bytes: int = Field(
        512 * 2**20, ge=0, description="Free space a push must leave on the staging file system, for everything else."
    )
    max_transfers: int = Field(2, ge=1, le=64, description="Transfers staged at once; a further one is refused.")
    max_archive_bytes: int = Field(2 * 2**30, ge=2**10, description="Largest bundle archive accepted, bytes.")
    max_chunks: int = Field(16_384, ge=1, le=16_384, description="Most chunks one transfer may have.")
    max_archive_members: int = Field(1000, ge=1, description="Most files and folders a bundle archive may unpack to.")
    transfer_timeout_s: float = Field(
        600.0, gt=0, description="A transfer that hears nothing this long is abandoned and removed."
    )


class SamplesConfig(_Section):
    """The sample store (agent/samples): which verdicts keep their frame, how much disk they may take."""

    enabled: bool = Field(
        True, description="Keep samples of verdicts (rejects, failsafes, close calls, random accepts)."
    )
    dir: Path | None = Field(None, description="Where samples are stored; None = <state_dir>/samples.")
    close_call_margin: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Accepts scoring within this share of the way from the calibration's median good score up to "
        "the threshold are kept as close calls (0.2 = the last fifth; 0 = none).",
    )
    random_one_in: int = Field(
        200, ge=0, description="Keep a pseudo-random 1 in N of the other accepts (per camera); 0 = none."
    )
    max_per_class: int = Field(
        500,
        ge=1,
        description="Samples kept per camera and class (reject, failsafe, close-call, random); the oldest unlabelled go first.",
    )
    max_bytes_per_class: int = Field(
        256 * 2**20, ge=2**20, description="Bytes kept per camera and class; the oldest unlabelled samples go first."
    )
    max_per_minute: int = Field(
        60, ge=1, description="Samples written per camera per minute at most; more are dropped and counted."
    )
    min_free_bytes: int = Field(
        1 * 2**30,
        ge=0,
        description="A sample is not written when its file system would have less free space than this.",
    )
    full_roi: bool = Field(
        False, description="Also keep the full ROI at camera resolution (PNG; large: copied on the decision thread)."
    )
    queue_length: int = Field(
        32,
        ge=1,
        le=1024,
        description="Samples waiting for the writer thread; when full, new ones are dropped and counted.",
    )
    thumbnail_px: int = Field(
        160, ge=32, le=256, description="Longer side of the JPEG thumbnail announced on MQTT with each sample."
    )
    label_keys: tuple[Path, ...] = Field(
        (),
        description="Public keys (.pub) of people allowed to label samples over MQTT; rollout.operator_keys may too.",
    )


class MetricsConfig(_Section):
    port: int = Field(9108, ge=0, le=65535, description="Prometheus metrics HTTP port; 0 = off.")
    host: str = Field("127.0.0.1", description="Address the metrics server listens on.")


class TomlSettings(BaseSettings):
    """Settings from a TOML file chosen at run time (load_settings), under LINEGUARD_... environment variables."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _CONFIG_PATH.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


class AgentConfig(TomlSettings):
    """The agent's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="LINEGUARD_", env_nested_delimiter="__", extra="forbid", frozen=True, toml_file=None
    )

    agent_id: str = Field("agent-1", pattern=r"^[A-Za-z0-9_-]+$", description="This agent's id in topics and status.")
    line: str = Field("line-1", pattern=r"^[A-Za-z0-9_-]+$", description="Production line name, used in topics.")
    run_dir: Path = Field(Path("/run/lineguard"), description="Folder for ZeroMQ ipc sockets.")
    state_dir: Path = Field(Path("/var/lib/lineguard"), description="Folder for the model store and agent state.")
    cameras: tuple[CameraConfig, ...] = Field((CameraConfig(),), min_length=1, description="One entry per camera.")
    models: tuple[ModelConfig, ...] = Field(
        (),
        max_length=16,
        description="Several models, one per model id, each camera naming its own (cameras[].model); "
        "none = every camera is scored by engine.bundle.",
    )
    ring: RingConfig = Field(default_factory=RingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _camera_names_unique(self) -> AgentConfig:
        names = [camera.name for camera in self.cameras]
        if len(set(names)) != len(names):
            msg = f"camera names must be unique, got {names}"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _cameras_name_configured_models(self) -> AgentConfig:
        ids = [model.id for model in self.models]
        if len(set(ids)) != len(ids):
            msg = f"model ids must be unique, got {ids}"
            raise ValueError(msg)
        for camera in self.cameras:
            if ids and camera.model not in ids:
                msg = f"camera {camera.name} must name its model (cameras.model), one of {', '.join(ids)}"
                raise ValueError(msg)
            if not ids and camera.model:
                msg = (
                    f"camera {camera.name} names model {camera.model!r}, but no [[models]] are configured; add "
                    f'[[models]] id = "{camera.model}" with its bundle, or leave cameras.model empty'
                )
                raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _one_threshold_override_per_model(self) -> AgentConfig:
        if self.models and self.decision.threshold is not None:
            msg = (
                "decision.threshold would override the threshold of every model; with [[models]] set "
                "models.threshold on the model it is meant for"
            )
            raise ValueError(msg)
        return self

    def threshold_override(self, model_id: str) -> float | None:
        """The configured threshold that replaces the calibrated one of model `model_id` (its slot id; "" = the
        one model), or None: the bundle's own."""
        if not self.models:
            return self.decision.threshold
        return next((model.threshold for model in self.models if model.id == model_id), None)

    @property
    def model_bundles(self) -> dict[str, Path]:
        """Model slot -> its start-up bundle. The slot is the model id; "" is the one model of engine.bundle."""
        if not self.models:
            return {"": self.engine.bundle}
        return {model.id: model.bundle for model in self.models}

    def cameras_of(self, slot: str) -> tuple[str, ...]:
        """The names of the cameras the model in `slot` scores."""
        return tuple(camera.name for camera in self.cameras if camera.model == slot)


_CONFIG_PATH: dict[str, Path | None] = {"path": None}
S = TypeVar("S", bound=TomlSettings)


def load_settings(settings_cls: type[S], path: Path | None, *, file_name: str) -> S:
    """Read and validate `settings_cls` from `path` (a `file_name` such as agent.toml) and the environment;
    ConfigError lists every problem as `key.path: message`."""
    if path is not None:
        if not path.is_file():
            msg = f"config file {path} does not exist; pass --config PATH to an {file_name} (see README)"
            raise ConfigError(msg)
        try:
            tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            msg = f"config file {path} is not valid TOML: {error}"
            raise ConfigError(msg) from error
    _CONFIG_PATH["path"] = path
    try:
        return settings_cls()
    except ValidationError as error:
        raise ConfigError(format_errors(error, path)) from error
    finally:
        _CONFIG_PATH["path"] = None


def load_config(path: Path | None) -> AgentConfig:
    """Read and validate the agent's configuration; ConfigError lists every problem as `key.path: message`."""
    return load_settings(AgentConfig, path, file_name="agent.toml")


def format_errors(error: ValidationError, path: Path | None) -> str:
    """One line per problem: `key.path: message (got value)`."""
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the README's configuration table"
        got = problem.get("input")
        suffix = f" (got {got!r})" if problem["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        lines.append(f"  {key}: {message}{suffix}")
    return "\n".join(lines)


PASSWORD_ENV = "LINEGUARD_MQTT__PASSWORD"


def write_worker_config(config: AgentConfig, path: Path) -> dict[str, str]:
    """Write the resolved config for the worker processes, without secrets, mode 0600.

    Returns the environment entries that carry the secrets to the workers instead (a process's
    environment is readable only by its user and root).
    """
    values = config.model_dump(mode="json")
    values["mqtt"]["password"] = ""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(values))
    secret = config.mqtt.password.get_secret_value()
    return {PASSWORD_ENV: secret} if secret else {}


def read_worker_config(path: Path) -> AgentConfig:
    """The config written by write_worker_config, with the password from the environment."""
    values = json.loads(path.read_text())
    values["mqtt"]["password"] = os.environ.get(PASSWORD_ENV, "")
    return AgentConfig.model_validate(values)
