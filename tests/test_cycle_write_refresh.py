"""Refreshes of unchanged setpoints are spread over the cycles, never later than each unit's
own interval: units written together (at start, or when the plan moves on a step) would
otherwise rewrite together forever, every unit's writes in one cycle and none in the next.
Real Modbus over loopback to the simulator's register images, a stepped clock."""

from __future__ import annotations

from collections import Counter

import pytest

from drivers.generic import GenericDriver
from drivers.modbus import ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.config import DeviceConfig, TcpTransport
from essd.cycle.write import write_all
from essd.devices import ManagedDevice
from essd.domain import DeviceState, Setpoint
from essd.events import EventBus, WriteStatus
from hil_sim.modbus_server import ModbusServer
from tests.support.devices import sample_image

UNITS = 4
PERIOD_S = 10.0  # cycle period; the units' TTL of 60 s gives a 20 s refresh: two slots


def _never(phase: str, exc: BaseException) -> str:
    raise AssertionError(f"{phase}: {exc!r}")


@pytest.mark.parametrize("spread", [False, True])
async def test_refreshes_are_spread_over_the_cycles_and_never_late(spread: bool) -> None:
    profile = resolve_profile("household-ess-setpoint")
    clock = SimClock(1_000.0)
    images = {k + 1: sample_image(profile) for k in range(UNITS)}
    for image in images.values():
        image.set_value("alarm_vebus_error", 0)  # healthy units
    async with ModbusServer.tcp(images) as server:
        ep = ModbusEndpoint(TcpTarget("127.0.0.1", server.port), clock=clock)
        devices = []
        for k in range(UNITS):
            driver = GenericDriver(
                device_id=f"u{k}", profile=profile, endpoint=ep, unit=k + 1, clock=clock
            )
            config = DeviceConfig(
                id=f"u{k}",
                profile=profile.name,
                transport=TcpTransport(kind="tcp", host="127.0.0.1", port=server.port, unit=k + 1),
            )
            devices.append(
                ManagedDevice(
                    config=config,
                    profile=profile,
                    driver=driver,
                    envelope=None,
                    clock=clock,
                    bus=EventBus(),
                    ttl_s=60.0,
                    stale_after_s=30.0,
                )
            )
        try:
            for d in devices:
                assert await d.read(mode_safe=False) is not None
                assert d.state is DeviceState.RUNNING
            interval = devices[0].refresh_interval_s()
            assert interval == pytest.approx(20.0)
            now = clock.monotonic()
            setpoints = {d.id: Setpoint(d.id, -1500.0, now, 60.0, "plan") for d in devices}
            per_cycle: list[int] = []
            last_write = dict.fromkeys(setpoints, clock.monotonic())
            longest = 0.0
            for cycle in range(40):  # 400 s: the same setpoint every cycle
                outcomes = await write_all(
                    devices,
                    setpoints,
                    standby=False,
                    on_failure=_never,
                    refresh_slots=(cycle, PERIOD_S) if spread else None,
                )
                written = [u for u, o in outcomes.items() if o.status is WriteStatus.WRITTEN]
                for u in written:
                    longest = max(longest, clock.monotonic() - last_write[u])
                    last_write[u] = clock.monotonic()
                per_cycle.append(len(written))
                clock.advance(PERIOD_S)
        finally:
            await ep.close()
    steady = per_cycle[4:]
    assert per_cycle[0] == UNITS  # the first cycle writes every unit
    assert longest <= interval  # never later than the unit's own interval
    # Every unit refreshes once every two cycles either way ...
    assert sum(steady) == pytest.approx(len(steady) * UNITS / 2, abs=UNITS)
    if spread:
        # ... spread over the two slots: half the units each cycle.
        assert Counter(steady) == {UNITS // 2: len(steady)}
    else:
        # ... all in the same cycles, none in the others.
        assert set(steady) == {0, UNITS}
