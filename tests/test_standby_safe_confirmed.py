"""A unit told standby is published "safe" only once its safe mode is written and read back;
one that acknowledges its safe mode but does not take it is FAULT, never "safe" (finding 3 of
"Safety under faults and hostile input"), against hil_sim over loopback Modbus."""

from __future__ import annotations

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.daemon import build_controller
from essd.domain import DeviceState
from essd.events import DeviceStateChanged, EventBus
from hil_sim.faults import FaultSpec
from tests.support.hil_sim import simulated_example


async def test_a_unit_ignoring_its_safe_mode_is_fault_never_safe_while_discharging() -> None:
    clock = SimClock()
    ignore = FaultSpec(kind="safe_mode_ignored", device="home-a", at=0, duration=3600)
    bus = EventBus()
    published: list[tuple[DeviceState, float]] = []  # what MQTT and logs were told, and truth
    async with simulated_example(clock, faults=[ignore]) as sim:

        def heard(ev: object) -> None:
            if isinstance(ev, DeviceStateChanged) and ev.device_id == "home-a":
                published.append((ev.new, sim.truth().batteries["home-a"].power_w))

        bus.subscribe(heard)
        pool = EndpointPool(clock=clock)
        controller = build_controller(sim.settings, clock=clock, bus=bus, pool=pool)
        try:
            controller.set_mode("manual")
            controller.set_manual_setpoint("home-a", 4_000.0, clock.now() + 3600)
            for _ in range(3):
                await controller.run_cycle()
                clock.advance(30)
            assert sim.truth().batteries["home-a"].power_w > 3_000  # discharging as told
            controller.set_mode("standby")
            seen = []
            for _ in range(6):
                event = await controller.run_cycle()
                seen.append(
                    (event.device_states["home-a"], sim.truth().batteries["home-a"].power_w)
                )
                assert event.device_states["pcs1"] is DeviceState.SAFE
                clock.advance(30)
            # Never "safe" while it discharges: FAULT until its own timer has stopped it.
            assert seen[0] == (DeviceState.FAULT, seen[0][1])
            assert seen[0][1] > 3_000
            assert all(power == 0.0 for state, power in seen if state is DeviceState.SAFE), seen
            # Nor was it ever announced "safe" (device state topic, log) while discharging.
            assert (DeviceState.FAULT, seen[0][1]) in published
            assert all(p == 0.0 for state, p in published if state is DeviceState.SAFE), published
            # Its own forcible period (the setpoint TTL) ends the discharge.
            assert sim.truth().batteries["home-a"].power_w == 0.0
        finally:
            await controller.safe_stop(1.0)
            await pool.close()


async def test_standby_is_safe_from_its_first_cycle_when_the_safe_mode_is_taken() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim:
        pool = EndpointPool(clock=clock)
        controller = build_controller(sim.settings, clock=clock, bus=EventBus(), pool=pool)
        try:
            await controller.run_cycle()
            clock.advance(30)
            controller.set_mode("standby")
            event = await controller.run_cycle()
            assert event.device_states["home-a"] is DeviceState.SAFE
            assert event.device_states["pcs1"] is DeviceState.SAFE
        finally:
            await controller.safe_stop(1.0)
            await pool.close()
