"""Aravis's fake GigE Vision camera (arv-fake-gv-camera-0.8) on loopback, for tests; skipped where missing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

FAKE_CAMERA = "arv-fake-gv-camera-0.8"
ADDRESS = "127.0.0.1"
GVCP_PORT = 3956


def gvcp_answers(timeout_s: float = 0.05) -> bool:
    """True when a GigE Vision device answers a register read (Control Channel Privilege) on ADDRESS."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect((ADDRESS, GVCP_PORT))
            sock.send(struct.pack(">BBHHHI", 0x42, 0x01, 0x0080, 4, 1, 0x0A00))  # READREG_CMD, ack required
            return len(sock.recv(64)) >= 12
        except OSError:  # refused (nothing there) or timed out
            return False


class FakeCamera:
    """An arv-fake-gv-camera-0.8 process on ADDRESS, started fresh (its state persists while it lives)."""

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if gvcp_answers():
            pytest.skip(f"another GigE Vision device already answers on {ADDRESS}:{GVCP_PORT}")
        with self._log_path.open("ab") as log_file:
            self.process = subprocess.Popen([FAKE_CAMERA, "-i", ADDRESS], stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + 5
        while not gvcp_answers():  # wait by asking, not by sleeping (~20-500 ms)
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{FAKE_CAMERA} did not come up: {self._log_path.read_text()[-500:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


def require_fake_camera() -> None:
    """Skip the calling test where the fake camera or Aravis's Python bindings are missing."""
    from lineguard.agent.capture import CameraError
    from lineguard.agent.capture.aravis import _import_aravis

    if shutil.which(FAKE_CAMERA) is None:
        pytest.skip(f"{FAKE_CAMERA} not installed (apt-get install aravis-tools-cli)")
    try:
        _import_aravis()
    except CameraError as error:
        pytest.skip(str(error))
