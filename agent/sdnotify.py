"""sd_notify without a dependency: READY, WATCHDOG and STOPPING to systemd over NOTIFY_SOCKET (agent and actuator)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class SystemdNotifier:
    """sd_notify over NOTIFY_SOCKET (READY, WATCHDOG, STOPPING); does nothing outside systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() else None

    def notify(self, state: str) -> None:
        if not self._address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), self._address)
            except OSError as error:
                log.warning("sd_notify %s failed: %s", state, error)
