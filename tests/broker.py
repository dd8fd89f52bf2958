"""A real Mosquitto broker on a free loopback port, for tests: plain, TLS (mutual) or with a password file.

    broker = MosquittoBroker(tmp_path)      # started; broker.host, broker.port
    broker.stop(); broker.start()           # same port again (broker-restart tests)
    broker.close()                          # or use it as a context manager
    line = MosquittoBroker(tmp_path / "line", bridge=bridge_block)   # bridged to another broker (a `connection` block)

Mosquitto logs to `<workdir>/mosquitto.log` (stderr: stdout is block-buffered into files); `log_text()`
returns it, and a broker that fails to start raises BrokerError with the log's tail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y --no-install-recommends mosquitto mosquitto-clients (./run test installs it)"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


class BrokerError(RuntimeError):
    """Mosquitto, openssl or mosquitto_passwd failed; the message carries their output."""


def find_program(name: str) -> str | None:
    """Path of a Mosquitto program (the broker lives in /usr/sbin, often not on a normal user's PATH)."""
    return shutil.which(name, path=_SEARCH_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, the broker's certificate (SAN localhost + 127.0.0.1) and a client certificate, all PEM."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Generate a CA, a server and a client certificate with openssl (EC P-256: ~0.1 s in all)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = folder / "ca.key", folder / "ca.crt"
    _openssl(
        [
            *("req", "-x509", "-new", *_EC_KEY, "-nodes", "-keyout", ca_key, "-out", ca_cert, "-days", "2"),
            *("-subj", "/CN=lineguard-test-ca", "-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash"),
        ]
    )
    server_cert, server_key = _signed_cert(
        folder, "server", ca_cert, ca_key, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"
    )
    client_cert, client_key = _signed_cert(folder, "client", ca_cert, ca_key, "extendedKeyUsage=clientAuth")
    return TlsFiles(ca_cert, server_cert, server_key, client_cert, client_key)


_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


def _signed_cert(folder: Path, name: str, ca_cert: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text(
        f"{extensions}\nbasicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(["req", "-new", *_EC_KEY, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN=lineguard-test-{name}"])
    _openssl(
        [
            *("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert),
            *("-days", "2", "-extfile", ext),
        ]
    )
    return cert, key


def _openssl(args: list[str | Path]) -> None:
    openssl = find_program("openssl")
    if openssl is None:
        raise BrokerError("openssl not found; apt-get install openssl")
    _run([openssl, *args])


def _run(command: list[str | Path]) -> None:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BrokerError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}")


class MosquittoBroker:
    """One `mosquitto -c CONF` process on 127.0.0.1:port, started by the constructor."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
        persistence: bool = False,
        acl_file: Path | None = None,
        bridge: str | None = None,
        start_timeout_s: float = 5.0,
    ) -> None:
        """Write the config into `workdir` and start the broker.

        tls: a TLS listener that requires a client certificate (see `.tls`); users: name -> password, no
        anonymous access; persistence: sessions and their queued QoS >= 1 messages survive stop()/start() (saved
        on SIGTERM). Do not add `queue_qos0_messages true`: with a QoS 0 message queued behind more than 20
        QoS 1 ones for an offline persistent subscriber, Mosquitto 2.0.11 lost the 21st QoS 1 message in about
        a third of the runs. acl_file: a Mosquitto ACL file (`topic`/`user`/`pattern` lines) the broker enforces
        (see deploy/mosquitto/README.md). bridge: a Mosquitto bridge (`connection NAME`, `address HOST:PORT`, `topic`
        lines: deploy/mosquitto/bridge.conf.example with its address set) appended to the config; the broker it
        names must be running first, or Mosquitto retries it every `restart_timeout`."""
        executable = find_program("mosquitto")
        if executable is None:
            raise BrokerError(f"mosquitto not installed; {INSTALL_HINT}")
        self.executable = executable
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = free_port()
        self.tls: TlsFiles | None = make_tls_files(workdir / "tls") if tls else None
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.acl_file = acl_file
        self.bridge = bridge
        self.config_path.write_text(self._config_text(users, persistence=persistence))
        self._process: subprocess.Popen[bytes] | None = None
        self.start(timeout_s=start_timeout_s)

    def _config_text(self, users: dict[str, str] | None, *, persistence: bool) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # The default 1000 silently drops QoS 1 messages for a slow subscriber (ENVIRONMENT.md).
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto drops to user `mosquitto` before it reads keys and the password file,
            # which live in a root-only temp dir: stay root (tests only).
            lines.append("user root")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 0"]
        else:
            lines.append("persistence false")
        if users:
            password_file = self.workdir / "passwords"
            password_file.write_text("")
            passwd = find_program("mosquitto_passwd")
            if passwd is None:
                raise BrokerError(f"mosquitto_passwd not found; {INSTALL_HINT}")
            for name, password in users.items():
                _run([passwd, "-b", password_file, name, password])
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        if self.bridge is not None:
            lines.append(self.bridge)  # last: every line after `connection` belongs to that bridge
        return "\n".join(lines) + "\n"

    @property
    def pid(self) -> int:
        """The running broker's process id (benchmarks read its CPU time from /proc/PID/stat)."""
        if self._process is None:
            raise BrokerError("the broker is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 5.0) -> None:
        """Start the broker (again, on the same port) and return once it accepts TCP connections."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.01)
            else:
                return
        self.close()
        raise BrokerError(f"mosquitto did not accept connections on port {self.port} within {timeout_s} s")

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """SIGTERM (Mosquitto saves persistence then), SIGKILL if it is still there after timeout_s."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def close(self) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> MosquittoBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "tls" if self.tls else "plain"
        return f"MosquittoBroker({self.host}:{self.port}, {kind}, running={self.running})"
