"""``make demo`` in a real terminal (tmux): what a newcomer sees.

The screen is polled, never timed: the progress line and the metrics URL must be on it, a
battery must show a non-zero power while the simulated clock is still within its first 30
minutes (30 s of wall time at the default 60x; the simulated clock runs on the wall clock, so
a loaded host shows the same simulated time, only fewer cycles), the live view must redraw in
place (one copy of it in the whole scrollback), and Ctrl-C must end it with a summary naming
the hours actually run.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.prometheus import program

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 140, 50
POLL_S = 0.5
STARTUP_S = 180.0  # `make` checks the venv, the simulator and the daemon start (loaded host)

PROGRESS = re.compile(r"simulated (\d\d):(\d\d) of 24:00 h \(\d+%\)\s+ETA \S+ at 60x")
DEVICE_ROW = re.compile(r"^(pcs1|home-a|home-b|camp1)\s+\S+\s+[\d.]+%\s+(-?\d+\.\d\d)\s", re.M)
STOPPED = re.compile(
    r"demo stopped: (\d+\.\d) of 24\.0 simulated hours run, (\d+) limit violations"
)


class Tmux:
    """One tmux server of our own (its own socket), one session running a command."""

    def __init__(self, command: str) -> None:
        self.tmux = program("tmux")
        self.socket = f"essd-demo-test-{os.getpid()}"
        self.command = command

    def _run(self, *args: str) -> str:
        out = subprocess.run(
            [self.tmux, "-L", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            # CI has no terminal of its own: tmux needs a TERM to start its server.
            env={**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"},
        )
        if out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> None:
        self._run(
            *("new-session", "-d", "-s", "demo", "-x", str(WIDTH), "-y", str(HEIGHT)),
            self.command,
        )

    def screen(self) -> str:
        """What the terminal shows now."""
        return self._run("capture-pane", "-p", "-t", "demo")

    def everything(self) -> str:
        """The scrollback and the screen."""
        return self._run("capture-pane", "-p", "-S", "-", "-t", "demo")

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "demo", *keys)

    def kill(self) -> None:
        subprocess.run(
            [self.tmux, "-L", self.socket, "kill-server"],
            capture_output=True,
            timeout=30,
            check=False,
        )


@pytest.fixture
def demo() -> Iterator[Tmux]:
    # The shell outlives make (its own Ctrl-C runs a no-op trap; the demo gets the default
    # SIGINT), so the summary and the exit status stay readable.
    term = Tmux(
        'bash -c "trap true INT; '
        f"cd {REPO} && TERM=xterm-256color make demo DEMO_ARGS='--metrics-port 0'; "
        'echo DEMO-EXIT=\\$?; exec sleep 600"'
    )
    term.start()
    try:
        yield term
    finally:
        term.kill()


def poll(term: Tmux, what: str, found: object, *, within_s: float) -> str:
    """The screen once ``found(screen)`` holds; fails naming ``what`` and the screen."""
    deadline = time.monotonic() + within_s
    screen = ""
    while time.monotonic() < deadline:
        screen = term.screen()
        if found(screen):  # type: ignore[operator]
            return screen
        time.sleep(POLL_S)
    pytest.fail(f"no {what} on the screen:\n{screen}")


def sim_minutes(screen: str) -> int:
    m = PROGRESS.search(screen)
    assert m is not None, screen
    return int(m.group(1)) * 60 + int(m.group(2))


def test_make_demo_shows_progress_urls_and_moving_batteries_then_an_honest_summary(
    demo: Tmux,
) -> None:
    screen = poll(demo, "progress line", PROGRESS.search, within_s=STARTUP_S)
    assert re.search(r"^metrics: http://127\.0\.0\.1:\d+/metrics", screen, re.M), screen
    assert re.search(r"^pcs1 industrial-sunspec-pcs modbus-tcp://127\.0\.0\.1:\d+", screen, re.M)
    assert "24 simulated hours at 60x (about 24 min) from 11:00" in screen

    def moving(s: str) -> bool:
        return any(abs(float(p)) >= 0.01 for _, p in DEVICE_ROW.findall(s))

    screen = poll(demo, "battery with a non-zero power", moving, within_s=STARTUP_S)
    assert sim_minutes(screen) < 30, screen  # within the first 30 s of wall time at 60x
    # The URLs are still on the screen while it runs (not scrolled away by redraws).
    assert "metrics: http://127.0.0.1:" in screen
    # One live region redrawn in place: a single copy of the view in the whole scrollback.
    time.sleep(2.0)
    history = demo.everything()
    assert history.count("essd  site cq-liangjiang-demo") == 1, history
    assert len(PROGRESS.findall(history)) == 1, history

    last = sim_minutes(demo.screen())
    demo.keys("C-c")
    screen = poll(demo, "exit summary", STOPPED.search, within_s=60.0)
    m = STOPPED.search(screen)
    assert m is not None
    hours = float(m.group(1))
    # The hours actually run: what the progress line last showed, give or take the time
    # between that capture and Ctrl-C; never the 24 hours asked for.
    assert last / 60 - 0.1 <= hours <= last / 60 + 0.5, (last, screen)
    assert int(m.group(2)) == 0
    assert re.search(r"^cost -?\d+\.\d\d CNY, saved by the batteries -?\d+\.\d\d CNY", screen, re.M)
    # make itself reports the interrupt; the demo stopped cleanly, without a traceback.
    poll(demo, "the end of make", lambda s: "DEMO-EXIT=" in s, within_s=30.0)
    history = demo.everything()
    assert "Traceback" not in history, history
    assert "HiGHS" not in history  # the solver never writes to the terminal
