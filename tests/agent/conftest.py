"""Agent fixtures: Aravis's fake GigE Vision camera, a bundle with a (fake) TensorRT engine, held frame-plan builds
(brokers are in tests/conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_tools import with_fake_engine
from fake_camera import FakeCamera, require_fake_camera
from fake_gpu import FakeBuilder


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCamera]:
    """A fresh arv-fake-gv-camera-0.8 on 127.0.0.1 for one test module (its state persists while it lives)."""
    require_fake_camera()
    camera = FakeCamera(tmp_path_factory.mktemp("fake-camera") / "fake-camera.log")
    camera.start()
    yield camera
    camera.kill()


@pytest.fixture
def bundle_with_engine(trained_work: Path, signing_key: Path, tmp_path: Path) -> Path:
    """A copy of the trained bundle with a (fake) fp16 TensorRT engine for an H200, batch <= 4, signed."""
    return with_fake_engine(trained_work / "bundle", tmp_path / "bundle", signing_key)


class HeldBuilds:
    """Fake TensorRT builds that wait for `release` (a build that takes long); `started` is set when one waits."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()


@pytest.fixture
def held_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldBuilds]:
    """Every FakeBuilder build waits until the test sets `release`; released, and its threads joined, at teardown."""
    held = HeldBuilds()
    build = FakeBuilder.build_serialized_network

    def wait_then_build(self: FakeBuilder, network: Any, config: Any) -> Any:
        held.started.set()
        if not held.release.wait(60):
            msg = "the test never released the held build"
            raise TimeoutError(msg)
        return build(self, network, config)

    monkeypatch.setattr(FakeBuilder, "build_serialized_network", wait_then_build)
    yield held
    held.release.set()  # a build left waiting would hold up every later one (one build at a time)
    for thread in threading.enumerate():
        if thread.name == "frame-plan-build":
            thread.join(60)
