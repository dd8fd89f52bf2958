"""The systemd units (agent and actuator), their example files and deploy/install_service.sh.

`systemd-analyze` (Debian package `systemd`; no running systemd needed) checks the unit; those tests are
skipped where it is missing. Two traps shape them:
- `systemd-analyze verify` exits 0 on parse errors (bad Type=, bad WatchdogSec=, unknown keys), so a unit
  passes only when verify prints nothing at all, on stdout or stderr.
- verify insists that ExecStart= names an executable that exists on the checking machine. The unit's
  /opt/lineguard/.venv/bin/lineguard-agent does not exist here, so the checks run on a copy whose ExecStart=
  names this checkout's console script (or `true`). Nothing else needs to exist: EnvironmentFile= is optional
  ("-" prefix), and User=, RuntimeDirectory= and StateDirectory= are only resolved when the service starts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lineguard.actuator.__main__ import build_parser as actuator_parser
from lineguard.actuator.config import load_config as load_actuator_config
from lineguard.agent.__main__ import build_parser
from lineguard.agent.config import load_config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "lineguard-agent.service"
TOML_EXAMPLE = REPO / "systemd" / "agent.toml.example"
ENV_EXAMPLE = REPO / "systemd" / "agent.env.example"
INSTALL_SCRIPT = REPO / "deploy" / "install_service.sh"
INSTALLED_COMMAND = "/opt/lineguard/.venv/bin/lineguard-agent"
ACTUATOR_UNIT = REPO / "systemd" / "lineguard-actuator.service"
ACTUATOR_TOML_EXAMPLE = REPO / "systemd" / "actuator.toml.example"
# Each unit runs its installed console script; the checks run a copy that names this checkout's instead.
UNITS = {UNIT: INSTALLED_COMMAND, ACTUATOR_UNIT: "/opt/lineguard/.venv/bin/lineguard-actuator"}
EXPOSURE_LIMIT = 2.0
# Pinned so a developer's SYSTEMD_LOG_LEVEL=debug or colours cannot add output to "prints nothing".
ANALYZE_ENV = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}


def _systemd_version() -> int:
    """systemd-analyze's version (`systemd 252 (252.39-1~deb12u2)` -> 252), 0 where it is missing."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return 0
    output = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.match(r"systemd (\d+)", output)
    return int(match.group(1)) if match else 0


needs_systemd_analyze = pytest.mark.skipif(
    _systemd_version() < 250,
    reason="needs systemd-analyze >= 250 (for security --offline): apt-get install systemd",
)


def _local_command(installed: str = INSTALLED_COMMAND) -> str:
    """An executable that exists here, to stand in for the installed console script in ExecStart=."""
    console_script = Path(sys.executable).parent / Path(installed).name
    if os.access(console_script, os.X_OK):
        return str(console_script)
    return shutil.which("true") or "/bin/true"


def checkable_copy(unit_text: str, folder: Path, command: str | None = None, *, unit: Path = UNIT) -> Path:
    """`unit_text` saved as folder/<unit name> with ExecStart= naming `command` (default: one that exists)."""
    installed = UNITS[unit]
    assert f"ExecStart={installed} " in unit_text, "the unit no longer runs the installed console script"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / unit.name
    copy.write_text(unit_text.replace(f"ExecStart={installed} ", f"ExecStart={command or _local_command(installed)} "))
    return copy


def verify_problems(unit: Path) -> str:
    """Everything `systemd-analyze verify` says about the unit, stdout and stderr; "" means no problem."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env=ANALYZE_ENV,
        timeout=60,
        check=False,
    )
    said = (result.stdout + result.stderr).strip()
    return said or (f"exit code {result.returncode}" if result.returncode else "")


def exposure_level(unit: Path) -> float:
    """The "Overall exposure level" of `systemd-analyze security --offline=true`: 0.0 (locked) to 10.0 (open)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        env=ANALYZE_ENV,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_the_unit_passes_systemd_analyze_verify_without_a_single_message(tmp_path, unit):
    assert verify_problems(checkable_copy(unit.read_text(), tmp_path, unit=unit)) == ""


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("directive", "mistake", "message"),
    [
        ("Type=notify", "Type=notfiy", "notfiy"),
        ("WatchdogSec=30s", "WatchdogSec=thirty", "thirty"),
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("DeviceAllow=char-video4linux rw", "DeviceAllow=char-video4linux rwx", "rwx"),
    ],
)
def test_verify_reports_a_deliberate_mistake(tmp_path, directive, mistake, message):
    text = UNIT.read_text()
    assert f"\n{directive}\n" in text
    assert message in verify_problems(checkable_copy(text.replace(f"\n{directive}\n", f"\n{mistake}\n"), tmp_path))


@needs_systemd_analyze
def test_verify_reports_an_exec_start_that_does_not_exist(tmp_path):
    missing = tmp_path / "missing" / "lineguard-agent"
    assert "is not executable" in verify_problems(checkable_copy(UNIT.read_text(), tmp_path, str(missing)))


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_the_unit_exposure_level_is_at_most_2_0(tmp_path, unit):
    assert exposure_level(checkable_copy(unit.read_text(), tmp_path, unit=unit)) <= EXPOSURE_LIMIT


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("directive", "mistake", "message"),
    [
        ("Type=notify", "Type=notfiy", "notfiy"),
        ("WatchdogSec=5s", "WatchdogSec=five", "five"),
        ("DeviceAllow=char-gpiochip rw", "DeviceAllow=char-gpiochip rwx", "rwx"),
    ],
)
def test_verify_reports_a_deliberate_mistake_in_the_actuator_unit(tmp_path, directive, mistake, message):
    text = ACTUATOR_UNIT.read_text()
    assert f"\n{directive}\n" in text
    copy = checkable_copy(text.replace(f"\n{directive}\n", f"\n{mistake}\n"), tmp_path, unit=ACTUATOR_UNIT)
    assert message in verify_problems(copy)


def test_the_actuator_unit_command_line_is_one_the_actuator_accepts_and_its_example_config_is_valid():
    exec_start = next(line for line in ACTUATOR_UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    program, *arguments = shlex.split(exec_start.removeprefix("ExecStart="))
    args = actuator_parser().parse_args(arguments)
    assert program == UNITS[ACTUATOR_UNIT]
    assert (args.command, args.config) == ("run", Path("/etc/lineguard/actuator.toml"))
    config = load_actuator_config(ACTUATOR_TOML_EXAMPLE)
    assert config.output.kind == "modbus-coil" and config.mode == "time"


@needs_systemd_analyze
def test_an_unhardened_unit_fails_the_exposure_check(tmp_path):
    bare = f"[Service]\nType=notify\nExecStart={INSTALLED_COMMAND} run --config /etc/lineguard/agent.toml\n"
    assert exposure_level(checkable_copy(bare, tmp_path)) > EXPOSURE_LIMIT


def test_the_unit_command_line_is_one_the_agent_accepts():
    exec_start = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    program, *arguments = shlex.split(exec_start.removeprefix("ExecStart="))
    args = build_parser().parse_args(arguments)
    assert program == INSTALLED_COMMAND
    assert (args.command, args.config) == ("run", Path("/etc/lineguard/agent.toml"))


def test_the_example_config_is_valid_and_uses_the_unit_directories():
    config = load_config(TOML_EXAMPLE)
    assert (config.run_dir, config.state_dir) == (Path("/run/lineguard"), Path("/var/lib/lineguard"))
    assert config.engine.bundle == Path("/var/lib/lineguard/models/active")
    assert config.engine.trusted_keys == (Path("/etc/lineguard/trainer.pub"),)
    unit = UNIT.read_text()
    assert "\nRuntimeDirectory=lineguard\n" in unit
    assert "\nStateDirectory=lineguard\n" in unit


def test_the_environment_file_examples_set_the_mqtt_credentials(monkeypatch):
    examples = re.findall(r"^# (LINEGUARD_\w+)=(\S+)$", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert {name for name, _ in examples} == {"LINEGUARD_MQTT__USERNAME", "LINEGUARD_MQTT__PASSWORD"}
    for name, value in examples:
        monkeypatch.setenv(name, value)
    config = load_config(TOML_EXAMPLE)
    assert (config.mqtt.username, config.mqtt.password.get_secret_value()) == (
        dict(examples)["LINEGUARD_MQTT__USERNAME"],
        "change-me",
    )


def _run_install_script(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL_SCRIPT), *arguments], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("prefix", ["/opt/lineguard", "/srv/lineguard"])
def test_install_script_dry_run_describes_the_unit_and_the_user_and_changes_nothing(prefix):
    watched = [Path("/etc/systemd/system") / UNIT.name, Path("/etc/lineguard"), Path("/var/lib/lineguard")]
    before = [path.exists() for path in watched]
    result = _run_install_script("--dry-run", "--prefix", prefix)
    assert result.returncode == 0, result.stderr
    assert "lineguard-agent.service" in result.stdout
    assert f"ExecStart={prefix}/.venv/bin/lineguard-agent" in result.stdout or "is up to date" in result.stdout
    assert re.search(r"user lineguard\b", result.stdout)
    assert [path.exists() for path in watched] == before


@pytest.mark.parametrize(
    ("service", "config_mode"),
    [("agent", "0640, root:lineguard"), ("actuator", "0640, root:lineguard"), ("ui", "0600, root:root")],
)
def test_install_script_installs_each_service_with_its_unit_config_and_account(service, config_mode):
    result = _run_install_script("--dry-run", "--service", service, "--prefix", "/srv/lg")
    assert result.returncode == 0, result.stderr
    unit = f"lineguard-{service}.service"
    assert f"{unit} would be written" in result.stdout or "is up to date" in result.stdout
    assert f"ExecStart=/srv/lg/.venv/bin/lineguard-{service} " in result.stdout
    config = f"/etc/lineguard/{service}.toml"
    assert f"installing {config} from systemd/{service}.toml.example (mode {config_mode})" in result.stdout or (
        f"{config} exists" in result.stdout
    )
    # The dashboard runs as a dynamic user: no account, and its files reach it as credentials (root only).
    assert ("useradd" in result.stdout or "user lineguard exists" in result.stdout) == (service != "ui")
    assert ("directory /var/lib/lineguard " in result.stdout) == (service == "agent")  # the model store
    assert f"lineguard-{service} check-config --config {config}" in result.stdout


def test_install_script_refuses_an_unknown_argument_or_a_relative_prefix():
    for arguments in (
        ["--dry-run", "--frobnicate"],
        ["--dry-run", "--prefix", "opt/lineguard"],
        ["--dry-run", "--service", "camera"],
    ):
        result = _run_install_script(*arguments)
        assert result.returncode == 2
        assert "error:" in result.stderr


# -- the dashboard's unit (systemd/lineguard-ui.service) ---------------------------------------------------------

UI_UNIT = REPO / "systemd" / "lineguard-ui.service"
UI_TOML_EXAMPLE = REPO / "systemd" / "ui.toml.example"
UI_ENV_EXAMPLE = REPO / "systemd" / "ui.env.example"
UI_INSTALLED_COMMAND = "/opt/lineguard/.venv/bin/lineguard-ui"


def ui_checkable_copy(unit_text: str, folder: Path) -> Path:
    """The dashboard unit with ExecStart= naming this checkout's lineguard-ui (or `true`)."""
    assert f"ExecStart={UI_INSTALLED_COMMAND} " in unit_text, "the unit no longer runs the installed console script"
    console_script = Path(sys.executable).parent / "lineguard-ui"
    command = str(console_script) if os.access(console_script, os.X_OK) else shutil.which("true") or "/bin/true"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / UI_UNIT.name
    copy.write_text(unit_text.replace(f"ExecStart={UI_INSTALLED_COMMAND} ", f"ExecStart={command} "))
    return copy


@needs_systemd_analyze
def test_the_dashboard_unit_passes_systemd_analyze_verify_without_a_single_message(tmp_path):
    assert verify_problems(ui_checkable_copy(UI_UNIT.read_text(), tmp_path)) == ""


@needs_systemd_analyze
def test_verify_reports_a_deliberate_mistake_in_the_dashboard_unit(tmp_path):
    text = UI_UNIT.read_text().replace("\nDynamicUser=yes\n", "\nDynamicUsr=yes\n")
    assert "Unknown key" in verify_problems(ui_checkable_copy(text, tmp_path))


@needs_systemd_analyze
def test_the_dashboard_unit_exposure_level_is_at_most_2_0(tmp_path):
    assert exposure_level(ui_checkable_copy(UI_UNIT.read_text(), tmp_path)) <= EXPOSURE_LIMIT


def test_the_dashboard_unit_command_line_is_one_lineguard_ui_accepts():
    from lineguard.ui.__main__ import build_parser as ui_parser

    exec_start = next(line for line in UI_UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    program, *arguments = shlex.split(exec_start.removeprefix("ExecStart="))
    args = ui_parser().parse_args(arguments)
    assert program == UI_INSTALLED_COMMAND
    # The dynamic user cannot read /etc/lineguard (root:lineguard 0750): systemd hands the file over as root.
    assert (args.command, args.config) == ("run", Path("%d/ui.toml"))
    assert "\nLoadCredential=ui.toml:/etc/lineguard/ui.toml\n" in UI_UNIT.read_text()


def test_the_dashboard_example_config_is_valid_and_uses_the_unit_directories(monkeypatch):
    from lineguard.ui.config import load_config as load_ui_config

    examples = re.findall(r"^# (LINEGUARD_UI_\w+)=(\S+)$", UI_ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    assert {name for name, _ in examples} == {"LINEGUARD_UI_MQTT__USERNAME", "LINEGUARD_UI_MQTT__PASSWORD"}
    for name, value in examples:
        monkeypatch.setenv(name, value)
    config = load_ui_config(UI_TOML_EXAMPLE)
    assert config.state_dir == Path("/var/lib/lineguard-ui") and config.http.host == "127.0.0.1"
    assert config.mqtt.password.get_secret_value() == "change-me"
    unit = UI_UNIT.read_text()
    assert "\nStateDirectory=lineguard-ui\n" in unit
    credentials = "/run/credentials/lineguard-ui.service/"
    for name in re.findall(r"^LoadCredential=-(\S+):", unit, flags=re.MULTILINE):
        assert f'"{credentials}{name}"' in UI_TOML_EXAMPLE.read_text(), name
