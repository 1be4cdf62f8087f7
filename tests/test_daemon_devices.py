"""Device lifecycle end to end over real Modbus: a unit unplugged and plugged back in."""

from __future__ import annotations

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import load_settings
from essd.daemon import build_controller
from essd.domain import DeviceState
from essd.events import DeviceStateChanged, Event, EventBus
from tests.support.site import EXAMPLE, serve_static_site


async def test_unplugged_unit_goes_degraded_then_recovers() -> None:
    async with serve_static_site(load_settings(EXAMPLE)) as site:
        clock = SimClock(1_782_900_000.0)
        bus = EventBus()
        changes: list[DeviceStateChanged] = []

        def record(event: Event) -> None:
            if isinstance(event, DeviceStateChanged) and event.device_id == "camp1":
                changes.append(event)

        bus.subscribe(record)
        pool = EndpointPool(clock=clock)
        ctl = build_controller(site.settings, clock=clock, bus=bus, pool=pool)
        try:
            for _ in range(2):
                event = await ctl.run_cycle()
                clock.advance(10)
            assert event.device_states["camp1"] is DeviceState.RUNNING

            site.unplug("camp1")
            for _ in range(3):
                event = await ctl.run_cycle()
                clock.advance(10)
            assert event.device_states["camp1"] is DeviceState.DEGRADED
            assert event.setpoints["camp1"].power_w == 0.0
            assert not event.snapshot.batteries["camp1"].available
            # The other devices carry on.
            assert event.device_states["home-a"] is DeviceState.RUNNING

            site.replug("camp1")
            for _ in range(12):  # the endpoint backs off after failures, then reconnects
                event = await ctl.run_cycle()
                clock.advance(10)
                if event.device_states["camp1"] is DeviceState.RUNNING:
                    break
            assert event.device_states["camp1"] is DeviceState.RUNNING
        finally:
            await pool.close()
    # Logged as transitions, not every cycle: running -> degraded once, degraded -> running once.
    assert [(c.old, c.new) for c in changes] == [
        (DeviceState.CONNECTING, DeviceState.RUNNING),
        (DeviceState.RUNNING, DeviceState.DEGRADED),
        (DeviceState.DEGRADED, DeviceState.RUNNING),
    ]
