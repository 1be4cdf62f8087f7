"""Start-up of the command line: the wall time of the real ``essd --help`` process (the
console script of the venv, as a user runs it), median of several runs. The issue's target
is 0.5 s; the optimizer, pydantic and the simulator load only when a command needs them.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import Result

RUNS = 7


def _essd() -> list[str]:
    script = Path(sys.executable).with_name("essd")
    if script.exists():
        return [str(script)]
    found = shutil.which("essd")
    return [found] if found else [sys.executable, "-m", "essd"]


def run() -> list[Result]:
    """``cli.help_s``: median wall time of ``essd --help`` over :data:`RUNS` runs."""
    cmd = [*_essd(), "--help"]
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t)
    return [Result("cli.help_s", statistics.median(times), "s")]
