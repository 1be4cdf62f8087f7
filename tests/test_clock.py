"""The injectable clock."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from essd.clock import Backoff, Clock, RealClock, SimClock, sleep_or_stop


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(RealClock(), Clock)
    assert isinstance(SimClock(), Clock)


async def test_stepped_clock_jumps_on_sleep() -> None:
    clock = SimClock(1000.0)
    assert clock.stepped
    assert math.isinf(clock.speed)
    await clock.sleep(3600)
    assert clock.now() == 4600.0
    assert clock.monotonic() == 3600.0


def test_stepped_clock_advance_and_set() -> None:
    clock = SimClock(0.0)
    clock.advance(10)
    clock.set(25)
    assert clock.now() == 25
    with pytest.raises(ValueError, match="never goes backwards"):
        clock.set(5)
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(-1)


async def test_running_clock_runs_faster_than_real_time() -> None:
    clock = SimClock(0.0, speed=1000.0)
    real = asyncio.get_running_loop().time()
    await clock.sleep(50)  # 50 simulated seconds = 50 ms real
    elapsed_real = asyncio.get_running_loop().time() - real
    assert clock.now() >= 50
    assert elapsed_real < 1.0


def test_speed_must_be_positive() -> None:
    with pytest.raises(ValueError, match="speed"):
        SimClock(speed=0)


def test_backoff_doubles_to_its_ceiling_and_jitters_below_it() -> None:
    plain = Backoff(initial_s=0.5, max_s=3.0)
    assert [plain.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = Backoff(initial_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(1)
    delays = [jittered.delay_s(3, rng) for _ in range(50)]
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 1


async def test_sleep_or_stop_ends_when_stopped() -> None:
    stop = asyncio.Event()
    clock = RealClock()
    stop.set()
    # An hour's sleep that a set stop event ends at once (wait_for only guards against a hang).
    await asyncio.wait_for(sleep_or_stop(clock, 3600.0, stop), timeout=60.0)
