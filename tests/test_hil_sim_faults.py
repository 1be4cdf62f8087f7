"""Every fault kind of the timeline, observed by a real pymodbus client (drivers.modbus)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from drivers.api import (
    ActivePowerControl,
    CommunicationError,
    DeviceExceptionResponse,
    RevertTimerControl,
)
from drivers.layout import register_words
from drivers.registers import Table
from essd.clock import SimClock
from essd.domain import BatteryReading
from hil_sim.faults import FaultError, FaultSpec, FaultTimeline, load_faults, load_faults_text
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from hil_sim.sunspec_image import SunSpecImage
from tests.support.hil_sim import (
    endpoint_for,
    example_settings,
    simulated_example,
    site_drivers,
)


def location(sim: SimulatedSite, device_id: str, register: str) -> tuple[Table, int, int]:
    """Table, address and word count of a profile register on a simulated device."""
    image = sim.device(device_id).image
    if isinstance(image, SunSpecImage):
        spec = image.spec(register)
        assert spec.point is not None
        _, pdef, address = image.map.locate(spec.point)
        return Table.HOLDING, address, pdef.size
    assert isinstance(image, ProfileImage)
    spec = image.spec(register)
    assert spec.address is not None
    return spec.table, spec.address, register_words(spec)


def fault(kind: str, device: str, **kw: object) -> FaultSpec:
    """A fault starting 10 s into the run, lasting 60 s unless said otherwise."""
    return FaultSpec.model_validate({"kind": kind, "device": device, "at": 10, **kw})


def step(sim: SimulatedSite, clock: SimClock, seconds: float) -> None:
    """Move the stepped clock and let the site apply what became due."""
    clock.advance(seconds)
    sim.truth()


async def read(sim: SimulatedSite, clock: SimClock, device: str, register: str) -> list[int]:
    """Read one register with a fresh client (closed afterwards)."""
    table, address, count = location(sim, device, register)
    ep, unit = endpoint_for(sim, device, clock)
    try:
        return await ep.read_registers(table, address, count, unit)
    finally:
        await ep.close()


@pytest.mark.parametrize(("kind", "device"), [("comm_loss", "home-a"), ("meter_loss", "meter")])
async def test_silent_device_times_out_then_answers_again(kind: str, device: str) -> None:
    clock = SimClock()
    register = "total_system_power" if device == "meter" else "state_of_capacity"
    async with simulated_example(clock, faults=[fault(kind, device, duration=60)]) as sim:
        assert await read(sim, clock, device, register)
        step(sim, clock, 10)
        started = time.perf_counter()
        with pytest.raises(CommunicationError, match="no answer"):
            await read(sim, clock, device, register)
        assert time.perf_counter() - started >= 0.25  # a timeout, not a refusal
        step(sim, clock, 60)
        assert await read(sim, clock, device, register)


async def test_delay_through_the_proxy_keeps_answers_in_order() -> None:
    clock = SimClock()
    spec = fault("delay", "pcs1", duration=60, delay_s=0.3)
    async with simulated_example(clock, faults=[spec]) as sim:
        table, address, count = location(sim, "pcs1", "wset_revert_time_s")
        expected = await read(sim, clock, "pcs1", "wset_revert_time_s")
        ep, unit = endpoint_for(sim, "pcs1", clock, timeout_s=2.0)
        try:
            assert await ep.read_registers(table, address, count, unit) == expected
            step(sim, clock, 10)
            for _ in range(3):  # several requests: every answer belongs to its request
                started = time.perf_counter()
                assert await ep.read_registers(table, address, count, unit) == expected
                assert time.perf_counter() - started >= 0.3
        finally:
            await ep.close()
        # A client with a shorter timeout than the delay sees no answer.
        fast, unit = endpoint_for(sim, "pcs1", clock, timeout_s=0.1)
        try:
            with pytest.raises(CommunicationError):
                await fast.read_registers(table, address, count, unit)
        finally:
            await fast.close()


async def test_frozen_registers_stop_changing_while_the_battery_moves() -> None:
    clock = SimClock()
    async with (
        simulated_example(clock, faults=[fault("frozen_registers", "pcs1", duration=600)]) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        drv = drivers["pcs1"]
        assert drv.capability(ActivePowerControl) is not None
        assert drv.capability(RevertTimerControl) is not None
        await drv.configure_revert_timer(3600)
        await drv.set_active_power(-100_000.0, duration_s=3600)
        step(sim, clock, 10)
        frozen = await read(sim, clock, "pcs1", "soc")
        soc0 = sim.truth().batteries["pcs1"].soc
        step(sim, clock, 300)
        assert sim.truth().batteries["pcs1"].soc > soc0 + 0.02
        assert await read(sim, clock, "pcs1", "soc") == frozen
        step(sim, clock, 300)
        assert await read(sim, clock, "pcs1", "soc") != frozen


async def test_ignored_writes_are_acknowledged_but_not_applied() -> None:
    clock = SimClock()
    async with simulated_example(
        clock, faults=[fault("ignored_writes", "home-a", duration=60)]
    ) as sim:
        _, address, _ = location(sim, "home-a", "forcible_charge_power")
        ep, unit = endpoint_for(sim, "home-a", clock)
        try:
            await ep.write_registers(address, [0, 1000], unit)
            step(sim, clock, 10)
            await ep.write_registers(address, [0, 3000], unit)  # no exception
            assert await ep.read_registers(Table.HOLDING, address, 2, unit) == [0, 1000]
            step(sim, clock, 60)
            await ep.write_registers(address, [0, 3000], unit)
            assert await ep.read_registers(Table.HOLDING, address, 2, unit) == [0, 3000]
        finally:
            await ep.close()


async def test_mode_reset_drops_the_connection_and_the_commanded_mode() -> None:
    clock = SimClock()
    async with (
        simulated_example(clock, faults=[fault("mode_reset", "pcs1")]) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        drv = drivers["pcs1"]
        assert drv.capability(ActivePowerControl) is not None
        await drv.set_active_power(30_000.0, duration_s=60)
        assert await read(sim, clock, "pcs1", "wset_enable") == [1]  # ENABLED
        server = sim.server_of("pcs1")
        assert server.connection_count >= 1  # the driver's connection
        step(sim, clock, 10)
        assert server.connection_count == 0
        # After reconnecting, a client finds the device in its own (safe) mode.
        assert await read(sim, clock, "pcs1", "wset_enable") == [0]
        assert sim.truth().batteries["pcs1"].power_w == 0.0


async def test_exception_responses_carry_the_configured_code() -> None:
    clock = SimClock()
    spec = fault("exception_responses", "home-b", duration=60, code=6)
    async with simulated_example(clock, faults=[spec]) as sim:
        step(sim, clock, 10)
        with pytest.raises(DeviceExceptionResponse) as err:
            await read(sim, clock, "home-b", "soc")
        assert err.value.code == 6
        step(sim, clock, 60)
        assert await read(sim, clock, "home-b", "soc")


async def test_bms_fault_zeroes_live_limits_and_raises_the_alarm() -> None:
    clock = SimClock()
    async with (
        simulated_example(clock, faults=[fault("bms_fault", "pcs1", duration=600)]) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        drv = drivers["pcs1"]
        ok = await drv.read()
        assert isinstance(ok, BatteryReading)
        assert ok.limits is not None
        assert ok.limits.max_charge_w > 0
        assert ok.alarms == ()
        step(sim, clock, 10)
        bad = await drv.read()
        assert isinstance(bad, BatteryReading)
        assert bad.limits is not None
        assert bad.limits.max_charge_w == 0
        assert bad.limits.max_discharge_w == 0
        assert any("OVER_TEMP_ALARM" in a for a in bad.alarms)
        step(sim, clock, 600 + 4 * 3600)  # fault over, cells cooled below the derating start
        again = await drv.read()
        assert isinstance(again, BatteryReading)
        assert again.limits is not None
        assert again.limits.max_charge_w > 0
        assert again.alarms == ()


async def test_unplugged_portable_unit_does_not_answer() -> None:
    clock = SimClock()
    async with simulated_example(clock, faults=[fault("unplugged", "camp1", duration=60)]) as sim:
        assert await read(sim, clock, "camp1", "total_battery_percent")
        step(sim, clock, 10)
        with pytest.raises(CommunicationError):
            await read(sim, clock, "camp1", "total_battery_percent")
        step(sim, clock, 60)
        assert await read(sim, clock, "camp1", "total_battery_percent")


async def test_connection_drop_cuts_open_connections() -> None:
    clock = SimClock()
    async with simulated_example(clock, faults=[fault("connection_drop", "home-a")]) as sim:
        table, address, count = location(sim, "home-a", "state_of_capacity")
        ep, unit = endpoint_for(sim, "home-a", clock)
        try:
            await ep.read_registers(table, address, count, unit)
            assert ep.connected
            step(sim, clock, 10)
            for _ in range(100):  # the client notices the closed socket
                if not ep.connected:
                    break
                await asyncio.sleep(0.01)
            assert not ep.connected
            assert await ep.read_registers(table, address, count, unit)  # reconnects
        finally:
            await ep.close()


async def test_connection_refused_for_the_fault_duration() -> None:
    clock = SimClock()
    spec = fault("connection_refused", "meter", duration=60)
    async with simulated_example(clock, faults=[spec]) as sim:
        assert await read(sim, clock, "meter", "total_system_power")
        step(sim, clock, 10)
        await asyncio.sleep(0.05)  # the listener closes on the event loop
        with pytest.raises(CommunicationError, match="cannot connect"):
            await read(sim, clock, "meter", "total_system_power")
        step(sim, clock, 60)
        await asyncio.sleep(0.05)
        assert await read(sim, clock, "meter", "total_system_power")


def test_fault_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "faults.yaml"
    path.write_text(
        "faults:\n"
        "  - {kind: delay, device: pcs1, at: 10m, duration: 5m}\n"
        "  - {kind: comm_loss, device: home-a, at: 1h, duration: -3}\n"
        "  - {kind: bms_fault, device: pcs1, at: 0, duration: 1m, colour: red}\n"
    )
    with pytest.raises(FaultError) as err:
        load_faults(path)
    text = str(err.value)
    assert f"{path}: faults.0: delay_s: required for kind delay" in text
    assert f"{path}: faults.1.duration: must be a finite duration >= 0" in text
    assert f"{path}: faults.2.colour: unknown field" in text
    with pytest.raises(FaultError, match=r"x\.yaml: faults\.0\.kind"):
        load_faults_text("faults: [{kind: meltdown, device: a, at: 0}]", "x.yaml")
    faults = load_faults_text("faults: [{kind: comm_loss, device: nope, at: 0, duration: 1}]", "f")
    with pytest.raises(FaultError, match=r"faults\.0\.device: no device 'nope'"):
        SimulatedSite(example_settings(), clock=SimClock(), faults=faults)


def test_timeline_orders_starts_and_ends() -> None:
    a = FaultSpec(kind="comm_loss", device="x", at=10, duration=5)
    b = FaultSpec(kind="connection_drop", device="y", at=15)
    timeline = FaultTimeline([a, b], start=100.0)
    assert timeline.due(109.9) == []
    assert [(t.fault.kind, t.active) for t in timeline.due(110)] == [("comm_loss", True)]
    due = timeline.due(200)
    assert [(t.fault.kind, t.active) for t in due] == [
        ("comm_loss", False),
        ("connection_drop", True),
    ]
    assert timeline.pending == 0
