"""Test support for the systemd units and sd_notify.

- :func:`unit_settings` reads the ``[Service]`` settings of a unit file (and its drop-ins).
- :func:`syscall_groups` / :func:`resolve_syscall_filter` turn ``SystemCallFilter=`` lines into
  the set of allowed system calls, using the tables of the installed ``systemd-analyze``.
- :func:`sandbox_preamble` is Python source that applies, in the process that runs it, the
  seccomp rules systemd derives from ``SystemCallFilter=``, ``SystemCallErrorNumber=``,
  ``MemoryDenyWriteExecute=`` and ``RestrictAddressFamilies=`` (through libseccomp, which
  systemd itself uses), so a workload can be run under the unit's rules without systemd.
- :class:`NotifyListener` is a real AF_UNIX datagram socket standing in for systemd's
  ``$NOTIFY_SOCKET``, recording every message with its arrival time.
- :func:`service_invocation` gives the command and environment that start a program the way
  systemd starts the unit's main process (notify socket, watchdog variables, ``Environment=``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"


def systemd_analyze() -> str:
    """The path of ``systemd-analyze`` (installed by ``make sysdeps``)."""
    found = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(found).exists():
        raise RuntimeError("systemd-analyze not found: run `make sysdeps` (Debian: systemd)")
    return found


def unit_settings(*files: Path, section: str = "Service") -> dict[str, list[str]]:
    """Every ``Key=value`` of ``section`` across ``files`` in order (later files are drop-ins).

    An empty assignment resets the list, as systemd does for list settings.
    """
    settings: dict[str, list[str]] = {}
    for file in files:
        current = None
        for raw in file.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
                continue
            if current != section:
                continue
            key, _, value = line.partition("=")
            values = settings.setdefault(key.strip(), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()
    return settings


def syscall_groups() -> dict[str, list[str]]:
    """The system call groups of the installed systemd: ``@name`` -> members (may be groups)."""
    out = subprocess.run(
        [systemd_analyze(), "syscall-filter"], check=True, capture_output=True, text=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in out.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw.startswith((" ", "\t")) and line.startswith("@"):
            current = groups.setdefault(line, [])
        elif current is not None:
            current.append(line)
    return groups


def _expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    if name not in groups:
        raise ValueError(f"SystemCallFilter: unknown group {name}")
    calls: set[str] = set()
    for member in groups[name]:
        calls |= _expand(member, groups)
    return calls


def resolve_syscall_filter(lines: list[str]) -> set[str]:
    """The allowed system calls for the ``SystemCallFilter=`` values of a unit (an allow list).

    The first line must be an allow list; later ``~`` lines remove from it and plain lines add,
    which is how systemd combines them. ``@default`` is always allowed.
    """
    if not lines or lines[0].startswith("~"):
        raise ValueError("SystemCallFilter: expected an allow list first")
    groups = syscall_groups()
    allowed = _expand("@default", groups)
    for line in lines:
        deny = line.startswith("~")
        names: set[str] = set()
        for word in line.lstrip("~").split():
            names |= _expand(word, groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


_FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}
_ERRNOS = {"EPERM": 1, "EACCES": 13, "ENOSYS": 38}


def sandbox_preamble(unit: Path) -> str:
    """Python source that confines the running process to ``unit``'s seccomp rules.

    systemd builds separate seccomp filters for the system call allow list, for
    ``MemoryDenyWriteExecute=`` and for ``RestrictAddressFamilies=``; the kernel applies the
    most restrictive answer of all filters. This builds the same three with libseccomp (the
    library systemd uses; systemd depends on it, so it is present wherever systemd-analyze
    is) and loads them with no_new_privs set, as systemd does for a ``NoNewPrivileges=`` unit.
    """
    settings = unit_settings(unit)
    allowed = sorted(resolve_syscall_filter(settings["SystemCallFilter"]))
    errno_name = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    errno = _ERRNOS[errno_name]
    mdwe = settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes"
    families = sorted(
        _FAMILIES[f] for line in settings["RestrictAddressFamilies"] for f in line.split()
    )
    return _SANDBOX_TEMPLATE.format(
        allowed=allowed, errno=errno, mdwe=mdwe, families=[int(f) for f in families]
    )


_SANDBOX_TEMPLATE = r"""
import ctypes, ctypes.util, mmap as _mmap

_lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
_lib.seccomp_init.restype = ctypes.c_void_p
_lib.seccomp_init.argtypes = [ctypes.c_uint32]
_lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
_lib.seccomp_load.argtypes = [ctypes.c_void_p]
_lib.seccomp_release.argtypes = [ctypes.c_void_p]


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Cmp)]

ALLOW = 0x7FFF0000
def ERRNO(e): return 0x00050000 | (e & 0xFFFF)
CMP_NE, CMP_LT, CMP_EQ, CMP_GT, CMP_MASKED_EQ = 1, 2, 4, 6, 7


def _rule(ctx, action, name, *cmps):
    nr = _lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a system call on this architecture (e.g. the 32-bit variants)
    arr = (_Cmp * max(1, len(cmps)))(*[_Cmp(*c) for c in cmps])
    rc = _lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add {{name}}")


def _load(ctx):
    rc = _lib.seccomp_load(ctx)
    _lib.seccomp_release(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")


# 1. MemoryDenyWriteExecute=: systemd refuses mmap with PROT_WRITE|PROT_EXEC, any
#    mprotect/pkey_mprotect adding PROT_EXEC, and shmat with SHM_EXEC.
if {mdwe!r}:
    ctx = _lib.seccomp_init(ALLOW)
    wx = _mmap.PROT_WRITE | _mmap.PROT_EXEC
    _rule(ctx, ERRNO(1), "mmap", (2, CMP_MASKED_EQ, wx, wx))
    _rule(ctx, ERRNO(1), "mprotect", (2, CMP_MASKED_EQ, _mmap.PROT_EXEC, _mmap.PROT_EXEC))
    _rule(ctx, ERRNO(1), "pkey_mprotect", (2, CMP_MASKED_EQ, _mmap.PROT_EXEC, _mmap.PROT_EXEC))
    _rule(ctx, ERRNO(1), "shmat", (2, CMP_MASKED_EQ, 0o100000, 0o100000))
    _load(ctx)

# 2. RestrictAddressFamilies=: socket() of any other family fails with EAFNOSUPPORT.
ctx = _lib.seccomp_init(ALLOW)
_families = {families!r}
_lo, _hi = min(_families), max(_families)
_rule(ctx, ERRNO(97), "socket", (0, CMP_LT, _lo, 0))
_rule(ctx, ERRNO(97), "socket", (0, CMP_GT, _hi, 0))
for _f in range(_lo + 1, _hi):
    if _f not in _families:
        _rule(ctx, ERRNO(97), "socket", (0, CMP_EQ, _f, 0))
_load(ctx)

# 3. SystemCallFilter= (allow list) with SystemCallErrorNumber=, loaded last because it
#    denies seccomp() itself (systemd, too, installs it after the others).
ctx = _lib.seccomp_init(ERRNO({errno}))
for name in {allowed!r}:
    _rule(ctx, ALLOW, name)
_load(ctx)
"""


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram: its ``KEY=value`` fields and when it arrived (monotonic s)."""

    fields: dict[str, str]
    at: float


class NotifyListener:
    """A real AF_UNIX datagram socket that receives sd_notify messages, like systemd's.

    ``address`` is the value for ``$NOTIFY_SOCKET`` (``@name`` for the abstract namespace).
    """

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"essd-test-notify-{os.getpid()}-{id(self)}"
            self._sock.bind("\0" + name)
            self.address = "@" + name
        else:
            if directory is None:
                raise ValueError("directory: needed for a socket path")
            path = directory / "notify.sock"
            self._sock.bind(str(path))
            self.address = str(path)
        self.received: list[Notification] = []

    def receive(self, timeout: float) -> Notification | None:
        """The next message within ``timeout`` seconds, or None."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(
            line.split("=", 1) for line in data.decode("utf-8").split("\n") if "=" in line
        )
        note = Notification(fields=fields, at=time.monotonic())
        self.received.append(note)
        return note

    def wait_for(self, key: str, timeout: float) -> Notification:
        """Receive until a message with ``key`` arrives; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            note = self.receive(left)
            if note is not None and key in note.fields:
                return note
        raise AssertionError(f"no {key} within {timeout} s; got {self.received}")

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> NotifyListener:
        """Use as a context manager."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the socket."""
        self.close()


def service_invocation(
    argv: Sequence[str],
    listener: NotifyListener,
    *,
    watchdog_s: float | None,
    unit: Path = UNIT_DIR / "essd.service",
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Command and environment to start ``argv`` as systemd starts ``unit``'s main process.

    Sets ``NOTIFY_SOCKET`` to ``listener``, the unit's ``Environment=`` lines, and, with
    ``watchdog_s``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. systemd sets ``WATCHDOG_PID`` to
    the main process's PID, which is only known once it runs: a shell sets it to its own PID
    (``$$``) and then ``exec``s the program, which keeps that PID. Pass the unit's own
    timeout (``WatchdogSec=``) or a shorter one to keep a test quick.
    """
    env = dict(os.environ if base_env is None else base_env)
    for line in unit_settings(unit).get("Environment", []):
        for assignment in line.split():
            key, _, value = assignment.partition("=")
            env[key] = value
    env["NOTIFY_SOCKET"] = listener.address
    env.pop("WATCHDOG_PID", None)
    env.pop("WATCHDOG_USEC", None)
    if watchdog_s is None:
        return list(argv), env
    env["WATCHDOG_USEC"] = str(round(watchdog_s * 1_000_000))
    return ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv], env


SCORE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")
