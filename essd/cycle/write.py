"""The cycle's write phase, and the safe stop: every unit concurrently, each isolated.

Only setpoints the safety supervisor produced are written. A unit in fault or safe state (or
every unit in standby) gets its safe mode written once and read back; a unit answering with
bad data is put in safe mode once; one unit's failure never stops another's write.

Unchanged setpoints are rewritten before the unit's own timeout would drop them
(:meth:`ManagedDevice.refresh_interval_s`). Units written in the same cycle (at start, or when
the plan moves on a step) would otherwise refresh in the same cycles forever, every unit's
writes in one cycle and none in the next: a refresh that spans ``m`` cycles is spread over
``m`` slots, unit ``k`` refreshing in the cycles ``c`` with ``(c + k) % m == 0`` once a cycle
has passed since its last write, and never later than its interval.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence

from essd.devices import ManagedDevice
from essd.domain import BatteryReading, DeviceState, Setpoint
from essd.events import WriteOutcome, WriteStatus


async def write_all(
    batteries: Sequence[ManagedDevice],
    setpoints: Mapping[str, Setpoint],
    *,
    standby: bool,
    on_failure: Callable[[str, BaseException], str],
    refresh_slots: tuple[int, float] | None = None,
) -> dict[str, WriteOutcome]:
    """Write every unit concurrently; each unit's outcome, never raising.

    ``refresh_slots``: (cycle number, cycle period s) to spread the units' refreshes over the
    cycles (see the module's docstring); None refreshes each when its interval has passed.
    """

    def slot(k: int, d: ManagedDevice) -> bool:
        if refresh_slots is None:
            return False
        cycle_no, period_s = refresh_slots
        m = math.ceil(d.refresh_interval_s() / period_s) if period_s > 0 else 1
        return m > 1 and (cycle_no + k) % m == 0

    async def one(k: int, d: ManagedDevice) -> WriteOutcome:
        sp = setpoints.get(d.id)
        if standby or d.state in (DeviceState.FAULT, DeviceState.SAFE):
            if not d.safe_written and not await d.enter_safe_mode():
                return d.outcome(WriteStatus.FAILED, d.last_write_error or d.reason)
            if standby and d.state is DeviceState.RUNNING:
                d.hold_safe("standby")  # its safe mode is written and read back
            return d.outcome(WriteStatus.SAFE_MODE)
        if d.state is DeviceState.DEGRADED:
            # Answering but with bad data: put it in safe mode once. Not answering: its
            # revert timer or heartbeat takes it to safe on its own.
            answers = d.last is not None and not d.safe_written and _answers(d)
            if answers and not await d.enter_safe_mode():
                return d.outcome(WriteStatus.FAILED, d.last_write_error)
            return d.outcome(WriteStatus.SAFE_MODE if d.safe_written else WriteStatus.SKIPPED)
        if sp is not None and d.state in (DeviceState.RUNNING, DeviceState.WRITE_FAILED):
            return await d.apply(sp, refresh_slot=slot(k, d))
        return d.outcome(WriteStatus.SKIPPED)

    async def isolated(k: int, d: ManagedDevice) -> tuple[str, WriteOutcome]:
        try:
            return d.id, await one(k, d)
        except Exception as exc:  # a device's write must never end the cycle
            on_failure("write", exc)
            return d.id, d.outcome(WriteStatus.FAILED, f"{type(exc).__name__}: {exc}")

    return dict(await asyncio.gather(*(isolated(k, d) for k, d in enumerate(batteries))))


async def safe_stop(batteries: Sequence[ManagedDevice], timeout_s: float) -> dict[str, bool]:
    """Write safe mode to every storage unit concurrently within ``timeout_s`` (real s)."""
    results: dict[str, bool] = {}

    async def one(d: ManagedDevice) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                results[d.id] = await d.enter_safe_mode()
        except TimeoutError:
            results[d.id] = False
        d.hold_safe("stopping")

    await asyncio.gather(*(one(d) for d in batteries))
    return results


def _answers(d: ManagedDevice) -> bool:
    last = d.last
    return isinstance(last, BatteryReading) and last.available
