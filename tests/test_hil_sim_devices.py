"""Simulated devices driven by the daemon's own drivers over real loopback Modbus."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    DeviceExceptionResponse,
    HeartbeatControl,
    OutputControl,
    RevertTimerControl,
)
from drivers.layout import encode_register
from drivers.profile import Capability, Profile
from drivers.profile_loader import list_profiles, resolve_profile
from drivers.profile_parts import SimulatedBehaviour
from drivers.registers import Table
from essd.clock import SimClock
from essd.config import SerialTransport, Settings
from essd.domain import BatteryReading, MeterReading
from hil_sim.devices import MeterDevice, build_storage_device
from hil_sim.faults import FaultSpec
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries
from hil_sim.store import RegisterAccessError
from tests.support.hil_sim import (
    endpoint_for,
    example_settings,
    simulated_example,
    site_drivers,
)


async def test_every_device_reads_its_true_state() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        truth = sim.truth()
        for dev_id, drv in drivers.items():
            reading = await drv.read()
            if isinstance(reading, MeterReading):
                meter = sim.devices[dev_id]
                assert isinstance(meter, MeterDevice)
                # Within the meter's accuracy (a floor plus a ratio), and f32 rounding.
                accuracy = meter.noise_w + meter.noise_ratio * abs(truth.grid_w) + 1.0
                assert reading.grid_power_w.value == pytest.approx(truth.grid_w, abs=accuracy)
                assert reading.grid_power_w.value != truth.grid_w  # a real meter wobbles
                continue
            assert isinstance(reading, BatteryReading)
            t = truth.batteries[dev_id]
            assert reading.soc.value == pytest.approx(t.soc, abs=2e-3), dev_id
            assert reading.power_w.value == pytest.approx(t.power_w, abs=10.0), dev_id


async def test_commands_move_power_soc_and_the_meter() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        commands = {"pcs1": -30_000.0, "home-a": 2_000.0, "home-b": -1_500.0}
        for dev_id, power in commands.items():
            drv = drivers[dev_id]
            assert drv.capability(ActivePowerControl) is not None
            result = await drv.set_active_power(power, duration_s=600)
            assert result.ok, result.mismatches
        camp = drivers["camp1"]
        assert camp.capability(ChargeLimitControl) is not None
        await camp.set_charge_limit(500.0)
        before = sim.truth()
        for dev_id, power in commands.items():
            assert before.batteries[dev_id].power_w == pytest.approx(power, abs=1.0)
        assert before.batteries["camp1"].power_w == pytest.approx(-500.0, abs=1.0)
        clock.advance(50)  # inside every device's revert timer (60 s at most)
        after = sim.truth()
        assert after.batteries["pcs1"].soc > before.batteries["pcs1"].soc
        assert after.batteries["home-a"].soc < before.batteries["home-a"].soc
        # The meter measures grid = load - PV - sum(battery power), > 0 imports.
        meter = await drivers["meter"].read()
        assert isinstance(meter, MeterReading)
        batteries = sum(b.power_w for b in after.batteries.values())
        exact = after.load_w - after.pv_w - batteries
        assert exact == pytest.approx(after.grid_w, abs=1e-6)  # the truth balances exactly
        sim_meter = sim.devices["meter"]
        assert isinstance(sim_meter, MeterDevice)
        # The meter reads it within its accuracy (a floor plus a ratio), and f32 rounding.
        accuracy = sim_meter.noise_w + sim_meter.noise_ratio * abs(exact) + 1.0
        assert meter.grid_power_w.value == pytest.approx(exact, abs=accuracy)
        for dev_id, power in commands.items():
            reading = await drivers[dev_id].read()
            assert isinstance(reading, BatteryReading)
            assert reading.power_w.value == pytest.approx(power, abs=10.0)


@pytest.mark.parametrize(
    ("device_id", "power_w", "timer_s"),
    [
        ("pcs1", 20_000.0, 30.0),  # 704 WSetRvrtTms configured by essd
        ("home-a", -3_000.0, 120.0),  # forcible period: the command's own duration
        ("home-b", 2_500.0, 60.0),  # fixed Hub4 setpoint watchdog
    ],
)
async def test_device_reverts_within_its_timer_when_not_refreshed(
    device_id: str, power_w: float, timer_s: float
) -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        drv = drivers[device_id]
        if drv.capability(RevertTimerControl) is not None:
            await drv.configure_revert_timer(timer_s)
        assert drv.capability(ActivePowerControl) is not None
        # Refreshed well inside the timer: the command holds.
        for _ in range(4):
            await drv.set_active_power(power_w, duration_s=timer_s)
            clock.advance(timer_s * 0.6)
            assert sim.truth().batteries[device_id].power_w == pytest.approx(power_w, abs=1.0)
        # essd stops refreshing: the device holds until its timer, then reverts by itself.
        await drv.set_active_power(power_w, duration_s=timer_s)
        clock.advance(timer_s - 1.0)
        assert sim.truth().batteries[device_id].power_w == pytest.approx(power_w, abs=1.0)
        clock.advance(2.0)
        truth = sim.truth().batteries[device_id]
        assert truth.power_w == 0.0
        assert truth.reverts == 1
        # ... and a reader sees it through the registers.
        reading = await drv.read()
        assert isinstance(reading, BatteryReading)
        assert reading.power_w.value == pytest.approx(0.0, abs=10.0)


async def test_lost_heartbeat_sends_the_pcs_to_safe_mode() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        drv = drivers["pcs1"]
        assert drv.capability(HeartbeatControl) is not None
        assert drv.capability(ActivePowerControl) is not None
        assert drv.capability(RevertTimerControl) is not None
        await drv.configure_revert_timer(3600)
        await drv.set_active_power(-40_000.0, duration_s=3600)
        for _ in range(5):
            await drv.heartbeat()
            clock.advance(30)
            assert sim.truth().batteries["pcs1"].power_w == pytest.approx(-40_000.0)
        clock.advance(31)  # 61 s since the last heartbeat: past 802's 60 s
        assert sim.truth().batteries["pcs1"].power_w == 0.0
        image = sim.storage("pcs1").image
        assert image.get_value("wset_enable") == 0.0  # DISABLED: the profile's safe mode


async def test_out_of_range_write_answers_exception_3_and_changes_nothing() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim:
        ep, unit = endpoint_for(sim, "home-a", clock)
        try:
            image = sim.storage("home-a").image
            assert isinstance(image, ProfileImage)
            spec = image.spec("forcible_charge_power")  # u32, 0..5000 W
            assert spec.address is not None
            before = image.get(Table.HOLDING, spec.address, 2)
            with pytest.raises(DeviceExceptionResponse) as err:
                await ep.write_registers(spec.address, [0, 6000], unit)
            assert err.value.code == 3
            assert image.get(Table.HOLDING, spec.address, 2) == before
            await ep.write_registers(spec.address, [0, 4000], unit)  # in range: accepted
            assert await ep.read_registers(Table.HOLDING, spec.address, 2, unit) == [0, 4000]
        finally:
            await ep.close()


async def test_ess_setpoint_flags_and_mode_limit_directions() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        drv = drivers["home-b"]
        assert drv.capability(ActivePowerControl) is not None
        dev = sim.storage("home-b")
        await drv.set_active_power(-2_000.0, duration_s=60)
        assert sim.truth().batteries["home-b"].power_w == pytest.approx(-2_000.0)
        ep, unit = endpoint_for(sim, "home-b", clock)
        try:
            await ep.write_registers(38, [1], unit)  # /Hub4/DisableCharge
            assert sim.truth().batteries["home-b"].power_w == 0.0
            await ep.write_registers(38, [0], unit)
            await ep.write_registers(33, [4], unit)  # /Mode off
            assert sim.truth().batteries["home-b"].power_w == 0.0
            await ep.write_registers(33, [3], unit)  # /Mode on
            assert sim.truth().batteries["home-b"].power_w == pytest.approx(-2_000.0)
            assert dev.image.get_value("state") == 252.0  # external control
        finally:
            await ep.close()


def test_status_register_shows_the_declared_values() -> None:
    # household-hybrid-forcible declares running status 1 standby, 2 running, 3 fault.
    dev = build_storage_device(
        device_id="h", profile=resolve_profile("household-hybrid-forcible"), clock=SimClock()
    )
    assert dev.image.get_value("running_status") == 1.0
    dev.set_bms_fault(True)
    dev.update()
    assert dev.image.get_value("running_status") == 3.0


def test_vendor_behaviour_is_declared_not_inferred_from_names() -> None:
    ess = resolve_profile("household-ess-setpoint")
    declared = build_storage_device(device_id="b", profile=ess, clock=SimClock())
    assert declared.image.get_value("mode") == 3.0  # power_on: /Mode "on"
    assert declared.image.get_value("state") == 1.0  # status: idle
    # The same registers and vendor names without the declaration: plain storage.
    bare = ess.model_copy(
        update={"simulation": ess.simulation.model_copy(update={"behaviour": SimulatedBehaviour()})}
    )
    plain = build_storage_device(device_id="b", profile=bare, clock=SimClock())
    assert plain.image.get_value("mode") == 1.0  # the register's lower bound
    assert plain.image.get_value("state") == 0.0  # no status kept


async def test_portable_outputs_and_availability() -> None:
    clock = SimClock()
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        drv = drivers["camp1"]
        assert drv.capability(OutputControl) is not None
        assert drv.capability(ChargeLimitControl) is not None
        await drv.set_charge_limit(0.0)
        reading = await drv.read()
        assert isinstance(reading, BatteryReading)
        assert reading.available
        assert reading.extras["ac_output_on"].value == 1.0
        away = FaultSpec(kind="unplugged", device="camp1", at=0, duration=3600, away_use_w=300)
        # Away with the outputs on: the campers' use drains it, the site sees nothing.
        sim.set_fault(away, active=True)
        soc0 = sim.truth().batteries["camp1"].soc
        clock.advance(1800)
        t = sim.truth()
        assert t.batteries["camp1"].power_w == 0.0
        assert not t.batteries["camp1"].available
        assert t.batteries["camp1"].soc < soc0 - 0.05
        reading = await drv.read()
        assert isinstance(reading, BatteryReading)
        assert not reading.available
        # Back, outputs off, away again: the outputs deliver nothing, the SoC stays.
        sim.set_fault(away, active=False)
        await drv.set_output(False)
        reading = await drv.read()
        assert isinstance(reading, BatteryReading)
        assert reading.extras["ac_output_on"].value == 0.0
        sim.set_fault(away, active=True)
        soc1 = sim.truth().batteries["camp1"].soc
        clock.advance(1800)
        assert sim.truth().batteries["camp1"].soc == pytest.approx(soc1, abs=1e-4)


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
async def test_every_shipped_profile_is_served_and_read_by_its_driver(profile: Profile) -> None:
    kind = "rtu-over-tcp" if profile.transport.framing == "rtu" else "tcp"
    site_settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "dut",
                "profile": profile.name,
                "transport": {
                    "kind": kind,
                    "host": "127.0.0.1",
                    "port": 1502,
                    "unit": profile.transport.unit,
                },
            }
        ],
    )
    clock = SimClock()
    series = SiteSeries.constant(ZoneInfo("UTC"), load_w=3_000.0, pv_w=1_000.0)
    async with (
        SimulatedSite(site_settings, clock=clock, series=series, free_ports=True) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        reading = await drivers["dut"].read()
    if isinstance(reading, MeterReading):
        # 2 kW within the simulated meter's accuracy (3 W + 0.1 %) and f32 rounding.
        assert reading.grid_power_w.value == pytest.approx(2_000.0, abs=3.0 + 2.0 + 1.0)
    else:
        assert isinstance(reading, BatteryReading)
        if profile.has(Capability.READ_STATE):  # a PCS whose BMS is a separate device: no SoC
            assert reading.soc.value == pytest.approx(profile.simulation.initial_soc, abs=2e-3)
        assert reading.power_w.valid
        assert reading.alarms == ()


async def test_portable_unit_on_a_serial_line_through_a_pty_pair() -> None:
    base = example_settings()
    devices = [
        d.model_copy(update={"transport": SerialTransport(kind="serial", port="/dev/null", unit=1)})
        if d.id == "camp1"
        else d
        for d in base.devices
    ]
    settings = base.model_copy(update={"devices": tuple(devices)})
    clock = SimClock()
    async with (
        SimulatedSite(settings, clock=clock, free_ports=True) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        line = next(e for e in sim.endpoints() if e.device_id == "camp1").line()
        path = sim.settings.devices[3].transport
        assert isinstance(path, SerialTransport)
        assert line == f"camp1 portable-power-station {path.port} unit=1"
        reading = await drivers["camp1"].read()
        assert isinstance(reading, BatteryReading)
        assert reading.soc.value == pytest.approx(0.8, abs=2e-3)


@settings(max_examples=40, deadline=None)
@given(
    soc0=st.floats(0.0, 1.0),
    steps=st.lists(
        st.tuples(st.integers(-6_000, 6_000), st.floats(0.0, 7_200.0)), min_size=1, max_size=10
    ),
)
def test_written_setpoints_never_exceed_live_limits(
    soc0: float, steps: list[tuple[int, float]]
) -> None:
    # The register store alone (no sockets), written as a client would: whatever is commanded,
    # what flows stays within the live limits and SoC within [0, 1].
    profile = resolve_profile("household-ess-setpoint")
    clock = SimClock()
    dev = build_storage_device(device_id="h", profile=profile, clock=clock, initial_soc=soc0)
    spec = profile.register("hub4_setpoint")
    assert spec.address is not None
    for power, dt in steps:
        words = encode_register(spec, float(power), transport=profile.transport, check_range=False)
        if abs(power) > 5_000:  # outside the register's range: refused, nothing changes
            with pytest.raises(RegisterAccessError) as err:
                dev.write(spec.address, words)
            assert err.value.code == 3
        else:
            dev.write(spec.address, words)
        clock.advance(dt)
        s = dev.true_state()
        assert 0.0 <= s.soc <= 1.0
        assert -s.limits.max_charge_w - 1e-6 <= s.power_w <= s.limits.max_discharge_w + 1e-6
        assert s.max_overshoot_w <= 1e-9


def test_writes_at_one_instant_advance_the_unit_once_a_later_one_runs_the_old_command() -> None:
    """A cycle writes several registers at one instant of a stepped clock: the unit is advanced
    to that instant once (by the read before them), each write then acts on what it changed. A
    write at a later instant first runs the command in force until then."""
    clock = SimClock()
    sim = SimulatedSite(example_settings(), clock=clock, free_ports=True)
    dev = sim.devices["home-a"]
    updates: list[float] = []
    update = dev.update

    def counted() -> None:
        updates.append(clock.now())
        update()

    dev.update = counted  # type: ignore[method-assign]
    dev.read(Table.HOLDING, 37758, 9)  # the unit is at this instant
    updates.clear()
    # Forcible discharge at 2 kW for 10 minutes: setting mode, period, power, command.
    for address, words in ((47246, [0]), (47083, [10]), (47249, [0, 2000]), (47100, [2])):
        dev.write(address, words)
    assert len(updates) == 4  # each acts on what it wrote, none advances the unit again
    sim.truth()  # the meter and the truth ask every unit for its state: nothing to advance
    assert len(updates) == 4
    soc = sim.truth().batteries["home-a"].soc
    assert sim.truth().batteries["home-a"].power_w == pytest.approx(2000.0)
    clock.advance(60.0)
    updates.clear()
    dev.write(47100, [0])  # stop
    assert len(updates) == 2  # advanced to now under the old command, then stopped
    assert sim.truth().batteries["home-a"].power_w == 0.0
    drop = soc - sim.truth().batteries["home-a"].soc
    assert drop == pytest.approx(2000.0 * 60 / 3600 / 0.95 / 10_000, rel=0.02)
