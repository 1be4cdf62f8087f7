"""Run ``essd demo`` as a process and find where it serves its metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def running_demo(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 60.0
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``essd demo --no-tui --metrics-port 0 ARGS``; yield (process, metrics URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "essd", "demo", "--no-tui", "--metrics-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = ""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("metrics: "):
                url = line.split(" ", 1)[1].strip()
                break
        assert url.startswith("http://"), "".join(lines)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
