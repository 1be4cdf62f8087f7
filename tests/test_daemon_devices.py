"""Device lifecycle end to end over TCP against hil_sim: a unit unplugged and plugged back in."""

from __future__ import annotations

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.domain import DeviceState
from essd.events import DeviceStateChanged, Event, EventBus
from hil_sim.faults import FaultSpec
from hil_sim.runner import SimulatedSite
from tests.support.site import EXAMPLE


async def test_unplugged_unit_goes_degraded_then_recovers() -> None:
    clock = SimClock(1_767_225_600.0)
    bus = EventBus()
    changes: list[DeviceStateChanged] = []

    def record(event: Event) -> None:
        if isinstance(event, DeviceStateChanged) and event.device_id == "camp1":
            changes.append(event)

    bus.subscribe(record)
    unplugged = FaultSpec(kind="unplugged", device="camp1", at=0.0, duration=600.0)
    async with SimulatedSite(load_settings(EXAMPLE), clock=clock, free_ports=True) as sim:
        pool = EndpointPool(clock=clock)
        ctl = build_controller(sim.settings, clock=clock, bus=bus, pool=pool)
        try:
            for _ in range(2):
                event = await ctl.run_cycle()
                clock.advance(10)
            assert event.device_states["camp1"] is DeviceState.RUNNING

            sim.set_fault(unplugged, active=True)  # the campers drive off with it
            for _ in range(3):
                event = await ctl.run_cycle()
                clock.advance(10)
            assert event.device_states["camp1"] is DeviceState.DEGRADED
            assert event.setpoints["camp1"].power_w == 0.0
            assert not event.snapshot.batteries["camp1"].available
            # The other devices carry on.
            assert event.device_states["home-a"] is DeviceState.RUNNING

            sim.set_fault(unplugged, active=False)  # and bring it back
            for _ in range(12):  # the endpoint backs off after failures, then reconnects
                event = await ctl.run_cycle()
                clock.advance(10)
                if event.device_states["camp1"] is DeviceState.RUNNING:
                    break
            assert event.device_states["camp1"] is DeviceState.RUNNING
            assert sim.truth().violations == ()
        finally:
            await pool.close()
    # Logged as transitions, not every cycle: running -> degraded once, degraded -> running once.
    assert [(c.old, c.new) for c in changes] == [
        (DeviceState.CONNECTING, DeviceState.RUNNING),
        (DeviceState.RUNNING, DeviceState.DEGRADED),
        (DeviceState.DEGRADED, DeviceState.RUNNING),
    ]
