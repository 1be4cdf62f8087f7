"""The injectable clock."""

from __future__ import annotations

import asyncio
import math

import pytest

from essd.clock import Clock, RealClock, SimClock


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
