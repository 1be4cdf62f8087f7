"""The cycle's write phase, and the safe stop: every unit concurrently, each isolated.

Only setpoints the safety supervisor produced are written. A unit in fault or safe state (or
every unit in standby) gets its safe mode written once and read back; a unit answering with
bad data is put in safe mode once; one unit's failure never stops another's write.
"""

from __future__ import annotations

import asyncio
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
) -> dict[str, WriteOutcome]:
    """Write every unit concurrently; each unit's outcome, never raising."""

    async def one(d: ManagedDevice) -> WriteOutcome:
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
            return await d.apply(sp)
        return d.outcome(WriteStatus.SKIPPED)

    async def isolated(d: ManagedDevice) -> tuple[str, WriteOutcome]:
        try:
            return d.id, await one(d)
        except Exception as exc:  # a device's write must never end the cycle
            on_failure("write", exc)
            return d.id, d.outcome(WriteStatus.FAILED, f"{type(exc).__name__}: {exc}")

    return dict(await asyncio.gather(*(isolated(d) for d in batteries)))


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
