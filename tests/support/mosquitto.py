"""A real mosquitto broker for tests: free loopback port, generated config, kill and restart.

Optionally with a password file (``users``) and a TLS listener whose CA, key and certificate
are generated with the ``openssl`` command line (``tls=True``; the CA is at :attr:`ca_file`), and
any further configuration lines (``options``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.net import free_port as _free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    return _free_port(HOST)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=30)


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: (ca.crt, server.crt, .key)."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(OPENSSL, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt,
         "-subj", "/CN=essd test CA", "-days", "2")  # fmt: skip
    _run(OPENSSL, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    _run(OPENSSL, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)  # fmt: skip
    return ca_crt, crt, key


class Mosquitto:
    """One mosquitto process; :meth:`kill` and :meth:`start` again keep the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        tls: bool = False,
        options: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.host = HOST
        self.port = free_port()
        self.users = dict(users or {})
        self.tls = tls
        self.options = tuple(options)
        self.ca_file: Path | None = None
        self.config_file = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",  # replies are small request/response messages
            "persistence false",  # a restart loses every retained message, like a crash would
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            # As root mosquitto would switch to the "mosquitto" user, which cannot read the
            # generated files in the test's directory; stay the user who runs the tests.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.users:
            pwfile = self.workdir / "passwd"
            pwfile.write_text("")
            for user, password in self.users.items():
                _run(MOSQUITTO_PASSWD, "-b", pwfile, user, password)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            ca, crt, key = make_tls_files(self.workdir)
            self.ca_file = ca
            lines += [f"cafile {ca}", f"certfile {crt}", f"keyfile {key}"]
        lines += self.options
        self.config_file.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> None:
        """Start the broker and wait until it accepts connections."""
        assert not self.running, "already running"
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = self.log_file.read_text() if self.log_file.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {log}")
            if _port_open(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the broker (a crash: clients see their connection drop)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=5)
        self._proc = None

    def stop(self) -> None:
        """Terminate the broker politely."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def restart(self) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start()
