"""Each configuration error exits 2 and names its key; start-up refuses a reject delay it cannot meet."""

from __future__ import annotations

import subprocess

import pytest
from actuator_tools import ACTUATOR, TOPICS, actuator_command, statuses, write_config
from mqtt_subscriber import Subscriber


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(actuator_command(*args), capture_output=True, text=True, timeout=timeout_s)


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "actuator.toml"
    path.write_text(text)
    return run_cli("check-config", "--config", str(path))


SOURCES = '[[sources]]\nagent = "press-3"\ncameras = ["top"]\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("reject_dealy_ms = 300\n" + SOURCES, "reject_dealy_ms"),
        ("reject_delay_ms = -5\n" + SOURCES, "reject_delay_ms"),
        ('mode = "speed"\n' + SOURCES, "mode"),
        ("", "sources"),
        ('[[sources]]\nagent = "press 3"\ncameras = ["top"]\n', "sources.0.agent"),
        ('[[sources]]\nagent = "press-3"\ncameras = []\n', "sources.0.cameras"),
        (SOURCES + SOURCES, "sources: each agent once"),
        (SOURCES + '[output]\nkind = "relay"\n', "output.kind"),
        (SOURCES + "[pulse]\nwidth_ms = 0\n", "pulse.width_ms"),
        (SOURCES + '[fault]\naction = "line-stop"\n', "modbus.run_coil"),
        (SOURCES + '[output]\nkind = "gpio"\n[fault]\naction = "line-stop"\n', "gpio.run_line"),
        (SOURCES + "[modbus]\nport = 70000\n", "modbus.port"),
        (SOURCES + "[mqtt]\nport = 0\n", "mqtt.port"),
        (SOURCES + "[count]\ndistance_counts = 0\n", "count.distance_counts"),
    ],
)
def test_each_configuration_error_exits_2_naming_the_key(tmp_path, text, key):
    result = check(tmp_path, text)
    assert result.returncode == 2 and key in result.stderr, result.stderr


def test_a_file_that_is_not_toml_exits_2(tmp_path):
    result = check(tmp_path, "reject_delay_ms = = 3")
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_environment_overrides_the_file_under_lineguard_actuator(tmp_path, monkeypatch):
    from lineguard.actuator.config import load_config

    path = tmp_path / "actuator.toml"
    path.write_text(SOURCES + '[modbus]\nhost = "10.0.0.5"\n')
    monkeypatch.setenv("LINEGUARD_ACTUATOR_MODBUS__HOST", "10.0.0.9")
    monkeypatch.setenv("LINEGUARD_ACTUATOR_REJECT_DELAY_MS", "900")
    config = load_config(path)
    assert (config.modbus.host, config.reject_delay_ms) == ("10.0.0.9", 900)


def test_a_good_configuration_passes_check_config(tmp_path):
    result = check(tmp_path, SOURCES)
    assert result.returncode == 0 and "configuration OK" in result.stdout


def test_gpio_without_a_chip_exits_2_naming_gpio_chip(tmp_path):
    """The real libgpiod error path: this kernel has no GPIO at all, so no chip can exist."""
    pytest.importorskip("gpiod")
    path = tmp_path / "actuator.toml"
    path.write_text(SOURCES + '[output]\nkind = "gpio"\n[gpio]\nchip = "/dev/gpiochip-lineguard-test"\n')
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2 and "gpio.chip /dev/gpiochip-lineguard-test" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_reject_delay_below_deadline_plus_latency_plus_margin_is_refused_naming_the_keys(
    broker, modbus_device, fake_agent, tmp_path
):
    config = write_config(tmp_path, broker, modbus_device, delay_ms=120)  # agent deadline 100 + margin 50 > 120
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    for words in ("reject_delay_ms = 120 cannot be met", "decision.deadline_ms 100", "margin_ms 50", "round trip"):
        assert words in result.stderr, result.stderr


@pytest.mark.slow
def test_without_the_agents_status_start_up_gives_up_with_exit_1_for_systemd_to_retry(broker, modbus_device, tmp_path):
    config = write_config(tmp_path, broker, modbus_device)
    config.write_text(config.read_text().replace("status_timeout_s = 10", "status_timeout_s = 1"))
    subscriber = Subscriber(broker, TOPICS.actuator_status(ACTUATOR))
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1 and "no status with deadline_ms from agent(s) press-3" in result.stderr
    assert statuses(subscriber) == []  # it never said it was online
