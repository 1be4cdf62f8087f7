"""`essd demo`: one command, no hardware, broker or config."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_example_site_and_reports_no_violation() -> None:
    # Two simulated hours at 240x real time. The demo's clock runs in real time, so how many
    # cycles fit depends on the host; what is asserted does not.
    out = subprocess.run(
        [
            *(sys.executable, "-m", "essd", "demo", "--no-tui"),
            *("--speed", "240", "--duration", "7200", "--metrics-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    # One line per simulated device with its Modbus address, as `essd sim` prints them.
    for device in ("pcs1", "home-a", "home-b", "camp1", "meter"):
        assert any(ln.startswith(f"{device} ") and "://127.0.0.1:" in ln for ln in lines), lines
    assert any(ln.startswith("metrics: http://127.0.0.1:") for ln in lines)
    cycles = [ln for ln in lines if " cycle=" in ln]
    assert cycles
    assert all("rung=" in ln and "setpoints[" in ln for ln in cycles)
    assert lines[-2].startswith("demo finished: 2.0 simulated hours, 0 limit violations")
    assert lines[-1].startswith("cost ")
    assert " saved by the batteries " in lines[-1]
    assert lines[0].startswith("essd demo: 2 simulated hours at 240x")
    # The solver never writes to stdout (HiGHS prints a banner unless told not to).
    assert "HiGHS" not in out.stdout
    assert "Running HiGHS" not in out.stderr


def test_demo_rejects_a_bad_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "essd", "demo", "--speed", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--speed" in out.stderr
