"""essd's heavy dependencies run under essd.service's seccomp rules.

`systemd-analyze` cannot start a unit without systemd as PID 1 (CI runs in a container), so
this applies the same kernel rules systemd derives from the unit's ``SystemCallFilter=``,
``SystemCallErrorNumber=``, ``MemoryDenyWriteExecute=`` and ``RestrictAddressFamilies=`` to a
Python process (see :func:`tests.support.systemd.sandbox_preamble`), then imports and uses what
the daemon uses: numpy's BLAS, cvxpy with Clarabel and HiGHS in worker threads, the Modbus,
MQTT and Prometheus libraries, a loopback TCP connection, the process metrics and sd_notify.
Every library is imported after the rules are loaded, so a shared object that needs an
executable stack or writable+executable memory would fail here as it would under systemd.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.systemd import UNIT_DIR, NotifyListener, sandbox_preamble

WORKLOAD = r'''
import asyncio, json, mmap, os, socket, sys

import numpy as np
import cvxpy as cp
import clarabel, highspy  # noqa: F401 - the two solvers essd configures
import aiomqtt, pydantic, pymodbus  # noqa: F401
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from essd.sdnotify import SystemdNotifier


def dispatch(solver):
    """A day of 15-minute steps for one battery: buy cheap, sell dear, within the SoC window."""
    n = 96
    rng = np.random.default_rng(7)
    price = cp.Parameter(n, value=rng.uniform(0.2, 1.2, n))
    load = rng.uniform(1e3, 5e3, n)
    c = cp.Variable(n, nonneg=True)
    d = cp.Variable(n, nonneg=True)
    e = cp.Variable(n + 1)
    cons = [e[0] == 5e3, e[1:] == e[:-1] + 0.25 * (0.95 * c - d / 0.95),
            e >= 1e3, e <= 9e3, c <= 5e3, d <= 5e3, load + c - d >= 0]
    problem = cp.Problem(cp.Minimize(price @ (c - d) * 0.25 / 1000), cons)
    assert problem.is_dpp()
    problem.solve(solver=solver)
    return problem.status, float(problem.value)


def refused(fn):
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


async def main():
    out = {}
    (s1, v1), (s2, v2) = await asyncio.gather(
        asyncio.to_thread(dispatch, "CLARABEL"), asyncio.to_thread(dispatch, "HIGHS"))
    out["solves"] = [[s1, v1], [s2, v2]]
    a = np.arange(400 * 400, dtype=float).reshape(400, 400) / 1e5
    out["blas"] = float(np.trace(a @ a.T))
    out["blas_expected"] = float(np.sum(a * a))
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    out["metrics"] = generate_latest(registry).decode()

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("localhost", port)
    writer.close()
    server.close()
    out["tcp"] = True
    # glibc's getaddrinfo asks netlink which address families are configured
    # (AI_ADDRCONFIG); without AF_NETLINK it must still resolve.
    out["addrconfig"] = len(socket.getaddrinfo("localhost", 502, flags=socket.AI_ADDRCONFIG))

    notifier = SystemdNotifier.from_environment()
    out["notified"] = notifier.ready(status="sandboxed")

    # The rules are really in force (otherwise this test would prove nothing):
    out["wx_mmap_errno"] = refused(
        lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
    out["netlink_errno"] = refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
    out["setaffinity_errno"] = refused(lambda: os.sched_setaffinity(0, {0}))
    print(json.dumps(out))


asyncio.run(main())
'''


def test_dependencies_work_under_the_units_seccomp_rules() -> None:
    unit = UNIT_DIR / "essd.service"
    script = sandbox_preamble(unit) + WORKLOAD
    with tempfile.TemporaryDirectory(prefix="essd-") as d, NotifyListener(Path(d)) as lst:
        result = subprocess.run(
            [sys.executable, "-c", script],
            check=False,
            env={"NOTIFY_SOCKET": lst.address, "PATH": "/usr/bin:/bin"},
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        note = lst.receive(1.0)
    assert note is not None
    assert note.fields == {"READY": "1", "STATUS": "sandboxed"}
    assert out["notified"] is True

    # Both solvers found the same optimum of the same linear program.
    (status1, value1), (status2, value2) = out["solves"]
    assert status1 == status2 == "optimal"
    assert abs(value1 - value2) <= 1e-4 * max(1.0, abs(value2))
    assert value1 < 0  # arbitrage on a varying price earns money
    assert abs(out["blas"] - out["blas_expected"]) <= 1e-9 * out["blas_expected"]

    # The process metrics read /proc/self/stat and /proc/stat (no ProcSubset=pid).
    assert "process_cpu_seconds_total" in out["metrics"]
    assert "process_start_time_seconds" in out["metrics"]
    assert out["tcp"] is True
    assert out["addrconfig"] > 0

    # MemoryDenyWriteExecute, RestrictAddressFamilies and ~@resources were in force.
    assert out["wx_mmap_errno"] == 1  # EPERM
    assert out["netlink_errno"] == 97  # EAFNOSUPPORT
    assert out["setaffinity_errno"] == 1  # EPERM (SystemCallErrorNumber=EPERM)
