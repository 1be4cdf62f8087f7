"""The systemd notification protocol (``sd_notify``), written directly on ``$NOTIFY_SOCKET``.

systemd passes a ``Type=notify`` service the address of an AF_UNIX datagram socket in
``$NOTIFY_SOCKET`` (a path, or an abstract-namespace name when it starts with ``@``) and, when
``WatchdogSec=`` is set, the watchdog timeout in ``$WATCHDOG_USEC`` (and the PID it applies to in
``$WATCHDOG_PID``). The service sends newline-separated ``KEY=value`` datagrams: ``READY=1``,
``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1``. No library is needed for that, and none is used.

Outside systemd (``NOTIFY_SOCKET`` unset) every method is a no-op that returns ``False``, so the
daemon calls them unconditionally. Sending never raises into the control loop: the socket is
non-blocking (a full receive queue drops the message instead of stalling a cycle), the first
failure is logged once, and the recovery once, as for any other transition.

How the daemon uses it: :meth:`SystemdNotifier.ready` after the first good cycle,
:meth:`SystemdNotifier.watchdog` every :attr:`SystemdNotifier.watchdog_interval_s`, and only
while cycles are healthy (a ping from a free-running timer would keep a stuck control loop alive),
:meth:`SystemdNotifier.status` with a one-line summary, :meth:`SystemdNotifier.stopping` on
SIGTERM before the safe stop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

_log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"

# The longest status text sent; systemd shows one line of it in `systemctl status` anyway.
_MAX_STATUS_CHARS = 400


def notify_address(value: str) -> str:
    """The socket address for a ``$NOTIFY_SOCKET`` value (``@name`` is the abstract ``\\0name``).

    Raises ``ValueError`` naming ``NOTIFY_SOCKET`` for a value that is neither an absolute path
    nor an abstract name, as sd_notify(3) does.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(
        f"{NOTIFY_SOCKET}: expected an absolute path or '@abstract-name', got {value!r}"
    )


def watchdog_timeout_from_environment(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd set for process ``pid`` in seconds, or None when there is none.

    ``$WATCHDOG_USEC`` must be a positive integer; when ``$WATCHDOG_PID`` is set it must name
    ``pid`` (otherwise the watchdog belongs to another process, e.g. our parent). Invalid
    values are logged and treated as no watchdog, as sd_watchdog_enabled(3) does.
    """
    raw_usec = environ.get(WATCHDOG_USEC)
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        _log.warning("%s=%r is not an integer: watchdog disabled", WATCHDOG_USEC, raw_usec)
        return None
    if usec <= 0:
        _log.warning("%s=%r is not positive: watchdog disabled", WATCHDOG_USEC, raw_usec)
        return None
    raw_pid = environ.get(WATCHDOG_PID)
    if raw_pid is not None:
        try:
            owner = int(raw_pid)
        except ValueError:
            _log.warning("%s=%r is not a PID: watchdog disabled", WATCHDOG_PID, raw_pid)
            return None
        if owner != pid:
            return None  # the watchdog is armed for another process
    return usec / 1_000_000


def _one_line(text: str) -> str:
    """Status text safe to embed in a newline-separated message."""
    flat = " ".join(text.split())
    return flat[:_MAX_STATUS_CHARS]


class SystemdNotifier:
    """Sends sd_notify messages to one socket; a no-op when there is no socket."""

    def __init__(self, *, address: str | None, watchdog_timeout_s: float | None = None) -> None:
        """Notify ``address`` (a socket path or ``\\0abstract`` name; None = do nothing).

        ``watchdog_timeout_s`` is systemd's watchdog timeout for this process, or None.
        """
        if watchdog_timeout_s is not None and not watchdog_timeout_s > 0:
            raise ValueError(f"watchdog_timeout_s: must be > 0, got {watchdog_timeout_s!r}")
        self._address = address
        self._watchdog_timeout_s = watchdog_timeout_s
        self._sock: socket.socket | None = None
        self._failing = False  # log the first failure and the recovery, not every message

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> SystemdNotifier:
        """A notifier configured from ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ``. With ``unset_environment`` the three variables
        are removed from it afterwards, so child processes (e.g. a simulator the daemon
        starts) do not inherit them and talk to systemd in our name.
        """
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET)
        address: str | None = None
        if raw:
            try:
                address = notify_address(raw)
            except ValueError as exc:
                _log.warning("%s: systemd notifications disabled", exc)
        timeout = (
            watchdog_timeout_from_environment(env, os.getpid()) if address is not None else None
        )
        if unset_environment:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)
        return cls(address=address, watchdog_timeout_s=timeout)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (the process runs under systemd)."""
        return self._address is not None

    @property
    def watchdog_timeout_s(self) -> float | None:
        """systemd's watchdog timeout for this process in seconds, or None."""
        return self._watchdog_timeout_s

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout (sd_watchdog_enabled(3)), or None."""
        if self._watchdog_timeout_s is None:
            return None
        return self._watchdog_timeout_s / 2

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        return self._send("READY=1", status)

    def watchdog(self) -> bool:
        """Keep the watchdog alive (``WATCHDOG=1``); send only from healthy cycles."""
        if self._watchdog_timeout_s is None:
            return False
        return self._send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=...``)."""
        return self._send(None, text)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start or stop timeout (``EXTEND_TIMEOUT_USEC``)."""
        if not seconds > 0:
            raise ValueError(f"seconds: must be > 0, got {seconds!r}")
        return self._send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def set_watchdog_timeout(self, seconds: float) -> bool:
        """Change the watchdog timeout at run time (``WATCHDOG_USEC=``), e.g. for long cycles.

        systemd applies it at once; :attr:`watchdog_interval_s` follows. Does nothing (and
        returns False) when the unit has no watchdog.
        """
        if not seconds > 0:
            raise ValueError(f"seconds: must be > 0, got {seconds!r}")
        if self._watchdog_timeout_s is None:
            return False
        sent = self._send(f"WATCHDOG_USEC={round(seconds * 1_000_000)}")
        if sent:
            self._watchdog_timeout_s = seconds
        return sent

    def notify(self, message: str) -> bool:
        """Send a raw message of ``KEY=value`` lines; True when it was handed to the socket."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never stall a control cycle on a full queue: drop the message and say so.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                _log.warning("systemd notification failed (%s); will keep trying", exc)
            self.close()  # a fresh socket next time, in case this one is broken
            return False
        if self._failing:
            self._failing = False
            _log.info("systemd notifications work again")
        return True

    def close(self) -> None:
        """Release the socket (the notifier stays usable and reopens it on the next message)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, field: str | None, status: str | None = None) -> bool:
        lines = [] if field is None else [field]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify("\n".join(lines))

    def __enter__(self) -> SystemdNotifier:
        """Use as a context manager that closes the socket at the end."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the socket."""
        self.close()
