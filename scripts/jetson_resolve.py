"""Resolve Lineguard's line-side dependencies for a Jetson (JetPack 6: aarch64, CPython 3.10) from PyPI; install nothing.

    python scripts/jetson_resolve.py                    # the tree a Jetson gets with constraints/jetpack6.txt
    python scripts/jetson_resolve.py --no-constraints   # what an unpinned install would get today
    python scripts/jetson_resolve.py --write            # re-pin constraints/jetpack6.txt to the newest that fits

pip's resolver gets the dependencies of pyproject.toml's core and of the extras (default: agent, actuator, cpu,
jetson), not the lineguard package itself, which is local: `pip install --dry-run --report --only-binary=:all:` for
the platforms manylinux2014_aarch64 and manylinux_2_28_aarch64 (JetPack 6 has glibc 2.35) and Python 3.10. pip reads
wheel metadata only (PEP 658) and installs nothing. pip evaluates environment markers (`python_version < '3.11'`)
against the interpreter that runs it even with --python-version (pypa/pip#11010, #13296), so it runs here with its
marker environment set to JetPack 6's; every requirement whose marker holds there must then be in the tree.

Only PyPI is asked (or PIP_INDEX_URL, a mirror of it): pip's configuration files, find-links and extra indexes are
ignored, so a wheel that exists only on this machine cannot make the check pass.

Exit codes: 0 resolves (with constraints: and every package is pinned), 1 does not (pip's error is printed),
2 bad usage, 3 the index cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "jetpack6.txt"
DEFAULT_EXTRAS = ("agent", "actuator", "cpu", "jetson")
PYPI = "https://pypi.org/simple"
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
PYTHON_VERSION = "3.10"
# JetPack 6.2 (L4T 36.4): Ubuntu 22.04's CPython 3.10 on aarch64. The keys are PEP 508's environment markers.
JETPACK6_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": "3.10.12",
    "os_name": "posix",
    "platform_machine": "aarch64",
    "platform_python_implementation": "CPython",
    "platform_release": "5.15.148-tegra",
    "platform_system": "Linux",
    "python_full_version": "3.10.12",
    "python_version": PYTHON_VERSION,
    "sys_platform": "linux",
}
# Caps for JetPack 6 on top of pyproject.toml: NVIDIA's CUDA 12.6 wheels for Jetson (onnxruntime-gpu from its index)
# are built against NumPy 1, as JetPack's TensorRT 10.3 bindings expect Ubuntu 22.04's NumPy 1.21. numpy<2 in turn
# holds opencv-python-headless at 4.11 (4.12 needs NumPy 2). cuda-python follows JetPack 6.1/6.2's CUDA 12.6.
# Applied when pinning and checking pins, not to --no-constraints.
JETPACK6_CAPS = ("numpy<2", "cuda-python==12.6.*")
# pip with its marker environment replaced before any of pip's modules import it; argv: markers JSON, pip arguments.
_PIP_WITH_MARKERS = """
import json, sys
from pip._vendor.packaging import markers
target, original = json.loads(sys.argv[1]), markers.default_environment
markers.default_environment = lambda: {**original(), **target}
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
# pip settings that only say how to reach the index, never what it serves: kept from the caller's environment.
_PIP_TRANSPORT = (
    "PIP_CERT",
    "PIP_CLIENT_CERT",
    "PIP_PROXY",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_CACHE_DIR",
)


class ResolveError(RuntimeError):
    """pip found no set of aarch64/cp310 wheels for the requirements; the message carries pip's error."""


class IndexUnreachable(RuntimeError):
    """The package index did not answer; nothing can be said about the dependencies."""


@dataclass(frozen=True)
class Resolution:
    """What pip would install: package name (PEP 503 normalised) -> version, and the wheel file of each."""

    versions: dict[str, str]
    wheels: dict[str, str]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The core dependencies plus those of `extras`, as pyproject.toml spells them (markers included), each once."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        msg = f"unknown extra(s) {', '.join(unknown)}; pyproject.toml has {', '.join(sorted(optional))}"
        raise ValueError(msg)
    chosen = list(project["dependencies"]) + [each for extra in extras for each in optional[extra]]
    return list(dict.fromkeys(chosen))


def check_index(index_url: str, *, timeout_s: float = 15.0) -> None:
    """Raise IndexUnreachable unless the index answers for one project page (pip's own)."""
    try:
        with urllib.request.urlopen(f"{index_url.rstrip('/')}/pip/", timeout=timeout_s) as answer:
            answer.read(1)
    except (urllib.error.URLError, OSError) as error:
        msg = f"{index_url} cannot be reached from here: {error}"
        raise IndexUnreachable(msg) from error


def resolve(wanted: list[str], *, constraints: Path | None, index_url: str) -> Resolution:
    """Ask pip what it would install for `wanted` on JetPack 6, from `index_url` only; raise ResolveError if nothing fits."""
    with tempfile.TemporaryDirectory(prefix="lg-jetson-") as folder:
        requirements_file, report = Path(folder) / "requirements.txt", Path(folder) / "report.json"
        requirements_file.write_text("\n".join(wanted) + "\n")
        command = [sys.executable, "-c", _PIP_WITH_MARKERS, json.dumps(JETPACK6_MARKERS), "install", "--dry-run"]
        command += ["--quiet", "--report", str(report), "--ignore-installed", "--only-binary=:all:"]
        command += [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        command += ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--target", str(Path(folder) / "t")]
        command += ["--index-url", index_url, "-r", str(requirements_file)]
        if constraints is not None:
            command += ["-c", str(constraints)]
        environment = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
        environment |= {key: os.environ[key] for key in _PIP_TRANSPORT if key in os.environ}
        environment |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)
        if done.returncode != 0:
            raise ResolveError(done.stderr.strip() or done.stdout.strip())
        answer = json.loads(report.read_text())
    seen = {key: answer["environment"].get(key) for key in ("python_version", "platform_machine")}
    if seen != {"python_version": PYTHON_VERSION, "platform_machine": "aarch64"}:
        msg = f"pip resolved for {seen}, not for JetPack 6: this pip's internals changed; the check proves nothing"
        raise ResolveError(msg)
    installs = answer["install"]
    versions = {normalise(each["metadata"]["name"]): each["metadata"]["version"] for each in installs}
    wheels = {normalise(each["metadata"]["name"]): each["download_info"]["url"].rsplit("/", 1)[-1] for each in installs}
    missing = [each for each in wanted if _applies(each) and normalise(Requirement(each).name) not in versions]
    if missing:
        msg = f"these requirements hold on JetPack 6 but pip left them out (markers evaluated for this machine?): {missing}"
        raise ResolveError(msg)
    return Resolution(versions, wheels)


def _applies(requirement: str) -> bool:
    marker = Requirement(requirement).marker
    return marker is None or marker.evaluate(JETPACK6_MARKERS)


def pins(constraints: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a constraints file."""
    found = {}
    for line in constraints.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            name, separator, version = text.partition("==")
            if not separator:
                msg = f"{constraints}: {line!r} is not a `name==version` pin"
                raise ValueError(msg)
            found[normalise(name.strip())] = version.strip()
    return found


def constraints_text(resolution: Resolution, extras: list[str]) -> str:
    header = [
        "# Lineguard on a Jetson (JetPack 6: aarch64, Ubuntu 22.04, CPython 3.10): every package of",
        f"# lineguard[{','.join(extras)}], pinned to versions with aarch64 cp310 wheels on PyPI. Use it with",
        "#     pip install -c constraints/jetpack6.txt '.[agent,actuator,jetson]'     (README: On a Jetson)",
        "# CI checks it resolves (tests/test_aarch64_install.py). Re-pin: python scripts/jetson_resolve.py --write",
        "# onnxruntime 1.23 is the last line for Python 3.10. Capped for JetPack 6 (why: scripts/jetson_resolve.py):",
        f"# {', '.join(JETPACK6_CAPS)}.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(resolution.versions.items())]
    return "\n".join([*header, *lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--extras", default=",".join(DEFAULT_EXTRAS), help="comma-separated extras of pyproject.toml")
    parser.add_argument("--constraints", type=Path, default=CONSTRAINTS, help="pins to resolve with")
    parser.add_argument("--no-constraints", action="store_true", help="resolve the newest versions that fit")
    parser.add_argument(
        "--write",
        action="store_true",
        help="pin the newest versions that fit (with the JetPack 6 caps) into --constraints",
    )
    arguments = parser.parse_args(argv)
    extras = [each for each in arguments.extras.split(",") if each]
    constraints = None if arguments.no_constraints or arguments.write else arguments.constraints
    index_url = os.environ.get("PIP_INDEX_URL", PYPI)
    try:
        wanted = requirements(ROOT / "pyproject.toml", extras)
        if not arguments.no_constraints:
            wanted += list(JETPACK6_CAPS)
        check_index(index_url)
        resolution = resolve(wanted, constraints=constraints, index_url=index_url)
        unpinned = sorted(set(resolution.versions) - set(pins(constraints))) if constraints else []
    except ValueError as error:
        print(f"jetson_resolve: {error}", file=sys.stderr)
        return 2
    except IndexUnreachable as error:
        print(f"jetson_resolve: {error}", file=sys.stderr)
        return 3
    except ResolveError as error:
        print(
            f"jetson_resolve: lineguard[{','.join(extras)}] does not resolve for aarch64/cp310:\n{error}",
            file=sys.stderr,
        )
        return 1
    for name, version in sorted(resolution.versions.items()):
        print(f"{name}=={version}  {resolution.wheels[name]}")
    if unpinned:
        print(f"jetson_resolve: {constraints} does not pin {', '.join(unpinned)}; re-pin with --write", file=sys.stderr)
        return 1
    if arguments.write:
        arguments.constraints.parent.mkdir(parents=True, exist_ok=True)
        arguments.constraints.write_text(constraints_text(resolution, extras))
        print(f"wrote {arguments.constraints}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
