"""Session fixtures: a small sample dataset, a signing key and one trained work folder, built once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import INSTALL_HINT, MosquittoBroker, find_program

# Two cores here: keep torch from oversubscribing them when pytest and ONNX Runtime share them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic brick dataset (MVTec layout with calibration split and masks)."""
    from lineguard.trainer.sample_data import SampleDataSpec, make_sample_dataset

    root = tmp_path_factory.mktemp("sample")
    spec = SampleDataSpec(
        n_train=16, n_calibration_good=6, n_calibration_defect=6, n_test_good=6, n_test_defect=8, seed=3
    )
    make_sample_dataset(root, categories=("brick",), spec=spec)
    return root / "brick"


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lineguard.agent.signing import generate_key_pair

    private_path, _ = generate_key_pair(tmp_path_factory.mktemp("keys") / "trainer.pem")
    return private_path


@pytest.fixture(scope="session")
def trained_work(sample_root: Path, signing_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder after a full `lineguard-train run` through the CLI entry point."""
    from lineguard.trainer.__main__ import main

    out = tmp_path_factory.mktemp("work")
    code = main(
        [
            "run",
            str(sample_root),
            "--out",
            str(out),
            "--sign-key",
            str(signing_key),
            "--bank-size",
            "1024",
            "--model-id",
            "brick-test",
            "--model-version",
            "1.0.0",
        ]
    )
    assert code == 0
    return out


# Short training for the epoch-trained models: enough to check the contract end to end, not accuracy.
QUICK_TRAINING = {"fastflow": ("--epochs", "3"), "fcdd": ("--epochs", "3", "--outliers-per-image", "2")}


@pytest.fixture(scope="session")
def trained_model_work(
    sample_root: Path, signing_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """trained_model_work(kind): a work folder after a short `lineguard-train run --model kind`, built once per kind."""
    from lineguard.trainer.__main__ import main

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            out = tmp_path_factory.mktemp(f"work-{kind}")
            arguments = ["run", str(sample_root), "--out", str(out), "--sign-key", str(signing_key), "--model", kind]
            arguments += [*QUICK_TRAINING[kind], "--model-id", f"brick-{kind}", "--model-version", "1.0.0"]
            assert main(arguments) == 0
            built[kind] = out
        return built[kind]

    return get


# Real Mosquitto brokers on loopback ports (tests/broker.py), shared by agent and deploy tests.
@pytest.fixture(scope="session")
def mosquitto_installed() -> None:
    if find_program("mosquitto") is None:
        pytest.skip(f"mosquitto is not installed: {INSTALL_HINT}")


@pytest.fixture
def broker(mosquitto_installed: None, tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A plain broker (anonymous, no persistence) for one test."""
    with MosquittoBroker(tmp_path / "broker") as started:
        yield started


@pytest.fixture(scope="module")
def tls_broker(mosquitto_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A TLS-only broker that requires a client certificate; its CA and client files are in `.tls`."""
    with MosquittoBroker(tmp_path_factory.mktemp("tls-broker"), tls=True) as started:
        yield started


@pytest.fixture
def broker_factory(mosquitto_installed: None, tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Build brokers with options (users=, persistence=, tls=); all are stopped after the test."""
    started: list[MosquittoBroker] = []

    def make(**options: Any) -> MosquittoBroker:
        new = MosquittoBroker(tmp_path / f"broker-{len(started)}", **options)
        started.append(new)
        return new

    yield make
    for each in started:
        each.close()
