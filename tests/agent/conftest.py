"""Agent fixtures: Aravis's fake GigE Vision camera (brokers are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_camera import FakeCamera, require_fake_camera


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCamera]:
    """A fresh arv-fake-gv-camera-0.8 on 127.0.0.1 for one test module (its state persists while it lives)."""
    require_fake_camera()
    camera = FakeCamera(tmp_path_factory.mktemp("fake-camera") / "fake-camera.log")
    camera.start()
    yield camera
    camera.kill()
