"""The line side installs on a Jetson (JetPack 6: aarch64, CPython 3.10) from PyPI: pip's resolver, asked for that
platform (scripts/jetson_resolve.py), finds wheels for the agent's and the actuator's whole tree, with the shipped
constraints/jetpack6.txt and without it. Nothing is installed; pip reads wheel metadata only.

These tests need PyPI. Where it cannot be reached they fail and say so, unless LINEGUARD_NETWORK_CHECKS=optional,
which turns that one case into a skip with the reason (CI has registry access and leaves it unset).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "jetson_resolve.py"
CONSTRAINTS = ROOT / "constraints" / "jetpack6.txt"
UNREACHABLE = 3  # the script's exit code when the index does not answer


def resolve(*arguments: str) -> subprocess.CompletedProcess:
    """Run the resolver; turn an unreachable PyPI into a failure (or, where allowed, a skip) naming the cause."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode == UNREACHABLE:
        reason = f"PyPI cannot be reached, so the Jetson install was not checked: {done.stderr.strip()}"
        if os.environ.get("LINEGUARD_NETWORK_CHECKS") == "optional":
            pytest.skip(reason)
        pytest.fail(f"{reason}\n(set LINEGUARD_NETWORK_CHECKS=optional to skip this check on a machine without PyPI)")
    return done


def resolved(done: subprocess.CompletedProcess) -> dict[str, str]:
    """name -> version from the resolver's output lines `name==version  wheel-file`."""
    return dict(line.split()[0].split("==") for line in done.stdout.splitlines() if "==" in line)


def test_the_agent_and_actuator_resolve_for_a_jetson_with_the_shipped_constraints():
    done = resolve()
    assert done.returncode == 0, f"pip could not resolve lineguard for JetPack 6:\n{done.stderr}"
    versions = resolved(done)
    assert versions["onnxruntime"].startswith("1.23.")  # the last onnxruntime line for Python 3.10
    assert "tomli" in versions  # a `python_version < '3.11'` requirement: markers were evaluated for 3.10
    for each in ("pyzmq", "paho-mqtt", "pymodbus", "asyncua", "gpiod", "cuda-python", "opencv-python-headless"):
        assert each in versions, each
    wheels = [line.split()[1] for line in done.stdout.splitlines() if "==" in line]
    assert all(wheel.endswith(("any.whl", "aarch64.whl")) and "x86_64" not in wheel for wheel in wheels), wheels


def test_an_unpinned_install_resolves_for_a_jetson_too():
    done = resolve("--no-constraints")
    assert done.returncode == 0, f"the newest releases do not resolve for aarch64/cp310:\n{done.stderr}"
    assert "onnxruntime" in resolved(done)


def test_a_requirement_without_aarch64_wheels_fails_the_check_with_pips_reason():
    # PyGObject (the gige extra) is published as source only: on a Jetson it comes from Ubuntu's python3-gi.
    done = resolve("--extras", "agent,gige", "--no-constraints")
    assert done.returncode == 1
    assert "does not resolve for aarch64/cp310" in done.stderr and "PyGObject" in done.stderr, done.stderr


def test_the_constraints_file_pins_every_package_exactly_with_jetpack6s_caps():
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, separator, version = line.partition("==")
            assert separator and version.strip(), f"not an exact pin: {line!r}"
            pins[name] = version
    assert pins["onnxruntime"].startswith("1.23.")
    assert int(pins["numpy"].split(".")[0]) < 2  # NVIDIA's CUDA 12.6 Jetson wheels are built against NumPy 1
    assert pins["cuda-python"].startswith("12.6.")  # JetPack 6.1/6.2's CUDA
    assert "onnxruntime-gpu" not in pins and "tensorrt" not in pins  # from NVIDIA's index and JetPack, not PyPI
