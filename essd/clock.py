"""Injectable time.

Nothing in the control path calls ``time.time()``, ``time.sleep()`` or ``asyncio.sleep()``
directly: it asks a :class:`Clock`. :class:`RealClock` is the wall clock of a gateway;
:class:`SimClock` is settable and runs at any speed, so ``hil_sim`` can play a day in seconds
with the very same code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo

log = logging.getLogger(__name__)

# A wall-clock jump larger than this (s) against the monotonic clock is a step, not drift.
WALL_STEP_THRESHOLD_S = 2.0


@runtime_checkable
class Clock(Protocol):
    """A source of time for the control path. All values are seconds."""

    def now(self) -> float:
        """Seconds since the Unix epoch (UTC), real or simulated."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for ages, timeouts and TTLs)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...

    @property
    def speed(self) -> float:
        """How many clock seconds pass per real second (1 for the real clock)."""
        ...


def _datetime(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.now(), tz=UTC)


class RealClock:
    """The wall clock, used in production."""

    @property
    def speed(self) -> float:
        """Real time: one second per second."""
        return 1.0

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep`` in real seconds."""
        await asyncio.sleep(max(0.0, seconds))

    def datetime(self) -> datetime:
        """Now as an aware UTC datetime."""
        return _datetime(self)


class SimClock:
    """A simulated clock: settable, and free to run faster than real time.

    ``anchor_wall`` (epoch s on the wall clock) pins a running clock so that separate processes
    (the daemon and a simulator) given the same start, speed and anchor agree on the time.

    With ``speed=None`` the clock is *stepped*: time stands still until :meth:`advance` or
    :meth:`set` moves it, and :meth:`sleep` jumps the clock forward to the sleeper's deadline
    (the earliest pending deadline wins), so a single control loop runs as fast as it can
    compute. With a numeric ``speed`` the clock runs continuously at ``speed`` simulated seconds
    per real second, which is what a separate simulator process needs to stay in step.
    """

    def __init__(
        self,
        start: float = 1_767_225_600.0,
        *,
        speed: float | None = None,
        anchor_wall: float | None = None,
    ) -> None:
        if speed is not None and (not math.isfinite(speed) or speed <= 0):
            raise ValueError(f"speed: must be a positive finite number, got {speed!r}")
        if anchor_wall is not None and speed is None:
            raise ValueError("anchor_wall: only a running clock (with a speed) has one")
        self._speed = speed
        self._origin_sim = float(start)
        self._origin_real = time.monotonic()
        if anchor_wall is not None:
            # Simulated time ``start`` was (or will be) at wall-clock time ``anchor_wall``:
            # processes given the same start, speed and anchor share one simulated time.
            self._origin_real -= time.time() - anchor_wall
        self._offset = 0.0  # manual advances on top of the running clock
        self._wall_step = 0.0  # steps of the wall clock alone (see step_wall)
        self._start = float(start)

    @property
    def speed(self) -> float:
        """Simulated seconds per real second (``inf`` for a stepped clock)."""
        return math.inf if self._speed is None else self._speed

    @property
    def stepped(self) -> bool:
        """True when time moves only by :meth:`advance`, :meth:`set` and :meth:`sleep`."""
        return self._speed is None

    def _elapsed(self) -> float:
        """Simulated seconds since the start, wall-clock steps excluded."""
        if self._speed is None:
            return self._origin_sim - self._start + self._offset
        return (
            self._origin_sim
            - self._start
            + self._offset
            + (time.monotonic() - self._origin_real) * self._speed
        )

    def now(self) -> float:
        """Simulated seconds since the epoch (including any wall-clock step)."""
        return self._start + self._elapsed() + self._wall_step

    def monotonic(self) -> float:
        """Simulated seconds since this clock was created (never decreases)."""
        return self._elapsed()

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone by ``seconds`` (either way), as NTP or an operator does:
        :meth:`now` jumps, :meth:`monotonic` and sleeps go on undisturbed."""
        if not math.isfinite(seconds):
            raise ValueError(f"seconds: must be finite, got {seconds!r}")
        self._wall_step += seconds

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (negative values are refused)."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds: must be a finite number >= 0, got {seconds!r}")
        self._offset += seconds

    def set(self, epoch_seconds: float) -> None:
        """Jump to an absolute time; only forwards, so monotonic readings stay monotonic."""
        delta = epoch_seconds - self.now()
        if delta < 0:
            raise ValueError("epoch_seconds: a simulated clock never goes backwards")
        self._offset += delta

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of simulated time."""
        seconds = max(0.0, seconds)
        if self._speed is None:
            self._offset += seconds
            await asyncio.sleep(0)  # let other tasks run, as a real sleep would
            return
        await asyncio.sleep(seconds / self._speed)  # the one place real time is converted

    def datetime(self) -> datetime:
        """Now as an aware UTC datetime."""
        return _datetime(self)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off for reconnects: ``initial_s`` after the first failure, times
    ``factor`` after each further one, at most ``max_s`` (seconds).

    ``jitter`` in [0, 1): the delay is drawn from ``[(1 - jitter) * d, d]``, so that many
    clients losing one server do not come back in step; 0 gives the plain sequence.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after ``failures`` consecutive failures (>= 1), seconds."""
        ceiling = min(self.max_s, self.initial_s * self.factor ** min(max(failures - 1, 0), 64))
        if self.jitter <= 0.0:
            return ceiling
        draw = (rng or random.Random()).uniform(1.0 - self.jitter, 1.0)  # noqa: S311 - jitter
        return ceiling * draw


async def sleep_or_stop(clock: Clock, seconds: float, stop: asyncio.Event) -> None:
    """Wait ``seconds`` on ``clock``, or until ``stop`` is set, whichever comes first."""
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sleeper, stopper):
            t.cancel()


def local_midnight(t: float, tz: ZoneInfo) -> float:
    """Epoch seconds of the local midnight (in ``tz``) that starts the day containing ``t``."""
    day = datetime.fromtimestamp(t, tz=tz)
    return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


class WallClockWatch:
    """Detects steps of the wall clock against the monotonic one (NTP, an operator, RTC).

    Control schedules and integrates on the monotonic clock only; the wall clock names the
    hour, the day and the billing period. A step is logged once when it happens.
    """

    def __init__(self, threshold_s: float = WALL_STEP_THRESHOLD_S) -> None:
        self._threshold_s = threshold_s
        self._last: tuple[float, float] | None = None
        self.steps = 0

    def observe(self, now: float, mono: float) -> float:
        """The wall-clock step (s, + forward) since the last call; 0.0 when there was none."""
        last, self._last = self._last, (now, mono)
        if last is None:
            return 0.0
        step = (now - last[0]) - (mono - last[1])
        if abs(step) <= self._threshold_s:
            return 0.0
        self.steps += 1
        log.warning(
            "wall clock stepped by %+.0f s; control runs on the monotonic clock, totals and "
            "the billing peak are integrated on it",
            step,
        )
        return step
