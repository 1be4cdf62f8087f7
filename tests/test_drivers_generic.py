"""The generic driver against real Modbus: decoding, invalid values, limits, actions, read-back.

Uses a small test profile (an industrial-style PCS with a scale-factor register, live limits,
heartbeat and revert timer) and the shipped household profiles with hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    HeartbeatControl,
    OutputControl,
    RevertTimerControl,
    SafeModeControl,
    ValueRefused,
)
from drivers.factory import EndpointPool
from drivers.generic import GenericDriver, _unknown_at_most, plan_reads
from drivers.modbus import ErrorKind, Framing, ModbusEndpoint, SerialTarget, TcpTarget
from drivers.profile import ActionName, Profile
from drivers.profile_loader import load_profile_text, resolve_profile
from drivers.registers import Table
from essd.clock import RealClock
from essd.config import DeviceConfig
from essd.domain import BatteryReading, LiveLimits, MeterReading, Quality
from essd.endpoints import build_driver, config_limits
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage
from hil_sim.store import ModbusExceptionCode, RegisterAccessError
from tests.support.devices import sample_image, serve_profile, words_of

PCS = """
schema: 1
name: test-pcs
description: Test PCS with SunSpec-like scale factors
device_class: industrial
source: test fixture
transport: {unit: 1, max_registers_per_read: 8}
capabilities: [read_state, active_power, live_limits, heartbeat, revert_timer, safe_mode,
               discharge_limit]
ratings: {capacity_wh: 100000, max_charge_w: 50000, max_discharge_w: 50000}
registers:
  - {name: soc, vendor_name: SoC, address: 0, type: u16, scale: 0.01, unit: "%", min: 0, max: 100}
  - {name: w, vendor_name: W, address: 1, type: s16, scale_factor: w_sf, unit: W,
     not_implemented: [0x8000]}
  - {name: w_sf, vendor_name: W_SF, address: 2, type: s16, not_implemented: [0x8000]}
  - {name: chg_max, vendor_name: ChaMax, address: 3, type: u16, unit: kW, scale: 0.1,
     not_implemented: [0xFFFF]}
  - {name: dis_max, vendor_name: DisMax, address: 4, type: u16, unit: kW, scale: 0.1,
     not_implemented: [0xFFFF]}
  - {name: alarm, vendor_name: Evt1, address: 5, type: u32}
  - {name: temp, vendor_name: Tmp, address: 7, type: f32, unit: degC, min: -40, max: 120}
  - {name: w_set, vendor_name: WSet, address: 20, type: s32, unit: W, access: rw,
     min: -50000, max: 50000}
  - {name: hb, vendor_name: CtrlHb, address: 22, type: u16, access: rw, max: 3}
  - {name: rvrt, vendor_name: WSetRvrtTms, address: 23, type: u16, unit: s, access: rw,
     min: 1, max: 3600}
  - {name: dis_lim, vendor_name: DisLim, address: 24, type: u16, unit: W, scale: 10,
     scale_factor: lim_sf, access: rw, min: 0, max: 50000}
  - {name: lim_sf, vendor_name: Lim_SF, address: 25, type: s16}
fields:
  soc: soc
  power_w: w
  max_charge_w: chg_max
  max_discharge_w: dis_max
  alarm_events: alarm
  temperature_c: temp
actions:
  set_active_power: {writes: [{register: w_set, param: power_w}]}
  heartbeat: {writes: [{register: hb, param: counter}]}
  configure_revert_timer: {writes: [{register: rvrt, param: seconds}]}
  set_discharge_limit: {writes: [{register: dis_lim, param: discharge_w}]}
  safe_mode: {writes: [{register: w_set, value: 0}]}
"""


@pytest.fixture
def pcs() -> Profile:
    return load_profile_text(PCS, "test-pcs.yaml")


def pcs_image(profile: Profile) -> ProfileImage:
    image = ProfileImage(profile)
    image.set_raw("soc", 5000)  # 50.00 %
    image.set_raw("w_sf", 1)
    image.set_raw("w", -1500)  # -15000 W: charging
    image.set_raw("chg_max", 300)  # 30.0 kW
    image.set_raw("dis_max", 250)  # 25.0 kW
    image.set_raw("alarm", 0)
    image.set_raw("temp", 31.5)
    image.set_raw("lim_sf", 1)
    return image


def test_reads_are_coalesced_into_blocks_within_the_limit(pcs: Profile) -> None:
    specs = [pcs.register(n) for n in ("soc", "w", "w_sf", "chg_max", "dis_max", "alarm", "temp")]
    blocks = plan_reads(specs, max_registers=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 7), (7, 2)]
    assert [(b.address, b.count) for b in plan_reads(specs, max_registers=125)] == [(0, 9)]
    # a gap splits a block unless the profile allows reading across it
    gap = [pcs.register("soc"), pcs.register("w_set")]
    assert len(plan_reads(gap, max_registers=125)) == 2
    assert [(b.address, b.count) for b in plan_reads(gap, max_registers=125, gap_max=19)] == [
        (0, 22)
    ]
    # registers the profile declares may be read across; unknown addresses may not
    apart = [pcs.register("soc"), pcs.register("chg_max")]
    assert len(plan_reads(apart, max_registers=125)) == 2
    assert [
        (b.address, b.count) for b in plan_reads(apart, max_registers=125, declared=pcs.registers)
    ] == [(0, 4)]
    # input and holding registers never share a block
    meter = resolve_profile("site-meter")
    blocks = plan_reads(meter.registers, max_registers=125, gap_max=100)
    assert {b.table for b in blocks} == {Table.INPUT}


async def test_values_decode_into_base_units_with_limits(pcs: Profile) -> None:
    override = LiveLimits(max_charge_w=40000, max_discharge_w=20000)
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        driver = GenericDriver(
            device_id="pcs1",
            profile=pcs,
            endpoint=dev.endpoint,
            clock=RealClock(),
            limits_override=override,
        )
        reading = await driver.read()
        assert isinstance(reading, BatteryReading)
        assert reading.soc.value == pytest.approx(0.5)
        assert reading.soc.unit == "ratio"
        assert reading.power_w.value == pytest.approx(-15000.0)
        assert reading.extras["max_charge_w"].value == pytest.approx(30000.0)
        assert reading.extras["temperature_c"].value == pytest.approx(31.5)
        # min(rating 50 kW, live 30/25 kW, config 40/20 kW)
        assert reading.limits == LiveLimits(max_charge_w=30000.0, max_discharge_w=20000.0)
        assert reading.capacity_wh == 100000
        assert reading.alarms == ()
        assert len(driver.read_plan) == 2


@pytest.mark.parametrize(
    ("register", "raw", "field", "reason"),
    [
        ("w", -0x8000, "power_w", "not implemented (raw 0x8000)"),
        ("w_sf", -0x8000, "power_w", "scale factor w_sf is not valid"),
        ("w_sf", 11, "power_w", "outside -10..10"),
        ("soc", 12000, "soc", "outside [0, 100]"),
        ("temp", math.nan, "temperature_c", "non-finite"),
        ("temp", math.inf, "temperature_c", "non-finite"),
        ("temp", 500.0, "temperature_c", "outside [-40, 120]"),
        ("chg_max", 0xFFFF, "max_charge_w", "not implemented (raw 0xFFFF)"),
    ],
)
async def test_invalid_values_become_invalid_readings(
    pcs: Profile, register: str, raw: float, field: str, reason: str
) -> None:
    image = pcs_image(pcs)
    image.set_raw(register, raw)
    async with serve_profile(pcs, image=image) as dev:
        fields = await dev.driver.read_fields()
        got = fields[field]
        assert got.quality is Quality.INVALID
        assert got.value is None
        assert reason in got.reason
        valid = [k for k, v in fields.items() if v.valid]
        assert field not in valid
        assert "soc" in valid or field == "soc"


async def test_an_unreadable_live_limit_counts_as_zero(pcs: Profile) -> None:
    image = pcs_image(pcs)
    image.set_raw("dis_max", 0xFFFF)
    async with serve_profile(pcs, image=image) as dev:
        reading = await dev.driver.read()
        assert isinstance(reading, BatteryReading)
        assert reading.limits == LiveLimits(max_charge_w=30000.0, max_discharge_w=0.0)


async def test_alarm_words_are_reported_as_raw_bits(pcs: Profile) -> None:
    image = pcs_image(pcs)
    image.set_raw("alarm", 0x0001_0002)
    async with serve_profile(pcs, image=image) as dev:
        reading = await dev.driver.read()
        assert isinstance(reading, BatteryReading)
        assert reading.alarms == ("alarm_events=0x10002",)


class RefusesFrom:
    """Answers ILLEGAL_DATA_ADDRESS for reads touching ``address`` or above."""

    def __init__(self, image: ProfileImage, address: int) -> None:
        self.image = image
        self.address = address

    def read(self, table: Table, address: int, count: int) -> list[int]:
        if address + count > self.address:
            raise RegisterAccessError(ModbusExceptionCode.ILLEGAL_DATA_ADDRESS)
        return self.image.read(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        self.image.write(address, values)


async def test_a_refused_block_makes_only_its_fields_missing(pcs: Profile) -> None:
    image = pcs_image(pcs)
    async with ModbusServer.tcp({1: RefusesFrom(image, 7)}) as srv:
        ep = ModbusEndpoint(TcpTarget("127.0.0.1", srv.port), clock=RealClock(), timeout_s=0.3)
        driver = GenericDriver(device_id="pcs1", profile=pcs, endpoint=ep, clock=RealClock())
        try:
            fields = await driver.read_fields()
            assert fields["temperature_c"].quality is Quality.MISSING
            assert "ILLEGAL_ADDRESS" in fields["temperature_c"].reason
            assert fields["soc"].valid
            assert driver.counters().errors_total == {ErrorKind.EXCEPTION.value: 1}
        finally:
            await ep.close()


async def test_capabilities_are_exactly_those_declared(pcs: Profile) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        d = dev.driver
        for proto in (ActivePowerControl, HeartbeatControl, RevertTimerControl, SafeModeControl):
            assert d.capability(proto) is d, proto
        assert d.capability(ChargeLimitControl) is None
        assert d.capability(OutputControl) is None
        # The method exists on every driver; one the profile does not back writes nothing.
        with pytest.raises(ValueRefused, match="has no enable_output"):
            await d.set_output(True)
        assert d.counters().writes_total == 0
    portable = resolve_profile("portable-power-station")
    async with serve_profile(portable) as dev:
        assert dev.driver.capability(ActivePowerControl) is None
        assert dev.driver.capability(OutputControl) is not None


async def test_set_active_power_writes_and_reads_back(pcs: Profile) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        assert dev.driver.capability(ActivePowerControl) is not None
        result = await dev.driver.set_active_power(-12000.0, duration_s=30.0)
        assert result.ok
        assert result.action == "set_active_power"
        assert result.registers_written == 1
        assert dev.image.get_raw("w_set") == -12000
        assert dev.driver.capability(SafeModeControl) is not None
        assert (await dev.driver.safe_mode()).ok
        assert dev.image.get_raw("w_set") == 0


@pytest.mark.parametrize(
    ("power", "duration"),
    [(60000.0, 30.0), (-50001.0, 30.0), (math.nan, 30.0), (100.0, 0.0), (100.0, math.inf)],
)
async def test_values_that_do_not_fit_are_refused_before_any_write(
    pcs: Profile, power: float, duration: float
) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        assert dev.driver.capability(ActivePowerControl) is not None
        before = words_of(dev.image, "w_set")
        with pytest.raises(ValueRefused):
            await dev.driver.set_active_power(power, duration_s=duration)
        assert words_of(dev.image, "w_set") == before
        assert dev.driver.counters().writes_total == 0


async def test_a_multi_step_action_is_refused_whole() -> None:
    hybrid = resolve_profile("household-hybrid-forcible")
    async with serve_profile(hybrid) as dev:
        assert dev.driver.capability(ActivePowerControl) is not None
        # 6 kW exceeds the forcible charge power register (0..5000 W): the earlier steps of the
        # action (mode, period) must not be written either.
        with pytest.raises(ValueRefused, match="forcible_charge_power"):
            await dev.driver.set_active_power(-6000.0, duration_s=60.0)
        assert dev.driver.counters().writes_total == 0


async def test_forcible_charge_discharge_sequence() -> None:
    hybrid = resolve_profile("household-hybrid-forcible")
    async with serve_profile(hybrid) as dev:
        d = dev.driver
        assert d.capability(ActivePowerControl) is not None
        await d.set_active_power(-2500.0, duration_s=30.0)  # charge 2.5 kW for 30 s
        assert dev.image.get_raw("forcible_charge_discharge") == 1
        assert dev.image.get_raw("forcible_charge_power") == 2500
        assert dev.image.get_raw("forcible_charge_discharge_period") == 1  # 30 s -> 1 min
        assert dev.image.get_raw("forcible_charge_discharge_setting_mode") == 0
        await d.set_active_power(3000.0, duration_s=61.0)
        assert dev.image.get_raw("forcible_charge_discharge") == 2
        assert dev.image.get_raw("forcible_discharge_power") == 3000
        assert dev.image.get_raw("forcible_charge_discharge_period") == 2  # 61 s -> 2 min
        writes_before = d.counters().writes_total
        await d.set_active_power(0.0, duration_s=60.0)
        assert dev.image.get_raw("forcible_charge_discharge") == 0
        assert d.counters().writes_total == writes_before + 1  # only the stop command


async def test_hand_computed_household_values() -> None:
    hybrid = resolve_profile("household-hybrid-forcible")
    image = sample_image(hybrid)
    image.set_raw("state_of_capacity", 873)  # 87.3 %
    image.set_raw("charge_discharge_power", 1500)  # vendor: charging 1.5 kW
    async with serve_profile(hybrid, image=image) as dev:
        reading = await dev.driver.read()
        assert isinstance(reading, BatteryReading)
        assert reading.soc.value == pytest.approx(0.873)
        assert reading.power_w.value == pytest.approx(-1500.0)
    ess = resolve_profile("household-ess-setpoint")
    image = sample_image(ess)
    image.set_raw("soc", 555)  # 55.5 %
    image.set_raw("ac_in_power", 180)  # x10 W: 1800 W from the grid
    image.set_raw("ac_out_power", 30)  # 300 W to the loads
    async with serve_profile(ess, image=image) as dev:
        reading = await dev.driver.read()
        assert isinstance(reading, BatteryReading)
        assert reading.soc.value == pytest.approx(0.555)
        assert reading.power_w.value == pytest.approx(300.0 - 1800.0)  # charging 1.5 kW
        assert dev.driver.capability(ActivePowerControl) is not None
        await dev.driver.set_active_power(2000.0, duration_s=60.0)  # discharge 2 kW
        assert dev.image.get_raw("hub4_setpoint") == -2000  # vendor: < 0 feeds back
    meter = resolve_profile("site-meter")
    image = sample_image(meter)
    image.set_raw("total_system_power", -4200.5)  # exporting
    async with serve_profile(meter, image=image) as dev:
        reading = await dev.driver.read()
        assert isinstance(reading, MeterReading)
        assert reading.grid_power_w.value == pytest.approx(-4200.5)
        image.set_raw("total_system_power", math.nan)
        reading = await dev.driver.read()
        assert isinstance(reading, MeterReading)
        assert reading.grid_power_w.quality is Quality.INVALID


async def test_heartbeat_counter_increments_and_wraps(pcs: Profile) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        assert dev.driver.capability(HeartbeatControl) is not None
        seen = []
        for _ in range(5):
            assert (await dev.driver.heartbeat()).ok
            seen.append(dev.image.get_raw("hb"))
        assert seen == [1, 2, 3, 0, 1]  # the register's max is 3


async def test_time_parameters_round_up(pcs: Profile) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        assert dev.driver.capability(RevertTimerControl) is not None
        await dev.driver.configure_revert_timer(0.4)
        assert dev.image.get_raw("rvrt") == 1
        await dev.driver.configure_revert_timer(90.2)
        assert dev.image.get_raw("rvrt") == 91
        with pytest.raises(ValueRefused):
            await dev.driver.configure_revert_timer(4000.0)


async def test_writes_use_the_scale_factor_register(pcs: Profile) -> None:
    async with serve_profile(pcs, image=pcs_image(pcs)) as dev:
        result = await dev.driver.perform(ActionName.SET_DISCHARGE_LIMIT, {"discharge_w": 12345})
        assert result.ok
        assert dev.image.get_raw("dis_lim") == 123  # scale 10 * 10**1
        assert dev.image.value("dis_lim").value == 12300.0
        with pytest.raises(ValueRefused, match="no set_charge_limit"):
            await dev.driver.perform(ActionName.SET_CHARGE_LIMIT, {"charge_w": 1})


class IgnoresWrites:
    """Accepts every write and keeps the old values: a device that silently drops commands."""

    def __init__(self, image: ProfileImage) -> None:
        self.image = image

    def read(self, table: Table, address: int, count: int) -> list[int]:
        return self.image.read(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        if not self.image.defined(Table.HOLDING, address, len(values)):
            raise RegisterAccessError(ModbusExceptionCode.ILLEGAL_DATA_ADDRESS)


async def test_read_back_mismatch_is_counted_and_reported(pcs: Profile) -> None:
    image = pcs_image(pcs)
    async with ModbusServer.tcp({1: IgnoresWrites(image)}) as srv:
        ep = ModbusEndpoint(TcpTarget("127.0.0.1", srv.port), clock=RealClock(), timeout_s=0.3)
        driver = GenericDriver(device_id="pcs1", profile=pcs, endpoint=ep, clock=RealClock())
        try:
            assert driver.capability(ActivePowerControl) is not None
            result = await driver.set_active_power(1000.0, duration_s=30.0)
            assert not result.ok
            assert result.mismatches == ("w_set: wrote [0, 1000], read back [0, 0]",)
            counters = driver.counters()
            assert counters.readback_mismatches_total == 1
            assert counters.errors_total == {ErrorKind.READBACK_MISMATCH.value: 1}
            assert counters.writes_total == 1
        finally:
            await ep.close()


async def test_factory_shares_endpoints_and_applies_the_config() -> None:
    hybrid = resolve_profile("household-hybrid-forcible")
    clock = RealClock()
    pool = EndpointPool(clock=clock)

    def config(dev_id: str, port: int, unit: int, **extra: float) -> DeviceConfig:
        return DeviceConfig.model_validate(
            {
                "id": dev_id,
                "profile": hybrid.name,
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port, "unit": unit},
                **extra,
            }
        )

    async with ModbusServer.tcp({1: sample_image(hybrid), 2: sample_image(hybrid)}) as srv:
        a = build_driver(
            config("a", srv.port, 1, max_discharge_w=2000.0), hybrid, clock=clock, pool=pool
        )
        b = build_driver(
            config("b", srv.port, 2, capacity_wh=8000.0), hybrid, clock=clock, pool=pool
        )
        c = build_driver(config("c", srv.port + 1, 1), hybrid, clock=clock, pool=pool)
        try:
            assert isinstance(a, GenericDriver)
            assert isinstance(b, GenericDriver)
            assert isinstance(c, GenericDriver)
            assert a.endpoint is b.endpoint
            assert c.endpoint is not a.endpoint
            assert len(pool.endpoints) == 2
            ra, rb = await a.read(), await b.read()
            assert isinstance(ra, BatteryReading)
            assert isinstance(rb, BatteryReading)
            assert ra.limits == LiveLimits(max_charge_w=5000.0, max_discharge_w=2000.0)
            assert rb.capacity_wh == 8000.0
            assert a.counters().requests_total == len(a.read_plan)
        finally:
            await pool.close()
    assert config_limits(config("d", 502, 1), hybrid) is None


def test_units_on_one_serial_line_share_one_endpoint() -> None:
    pool = EndpointPool(clock=RealClock())
    a = pool.endpoint(SerialTarget("/dev/ttyUSB0", 9600))
    b = pool.endpoint(SerialTarget("/dev/ttyUSB0", 19200))
    c = pool.endpoint(SerialTarget("/dev/ttyUSB1", 9600))
    d = pool.endpoint(TcpTarget("gw", 502, Framing.RTU))
    e = pool.endpoint(TcpTarget("gw", 502, Framing.SOCKET))
    assert a is b
    assert len({id(x) for x in (a, c, d, e)}) == 4


def test_counting_unknown_addresses_stops_past_the_gap_allowed() -> None:
    """Planning reads of registers 15,000 addresses apart (household-hybrid-forcible: 32008,
    37758, 47075) counts unknown addresses only up to the gap allowed, not over the whole span."""
    seen: list[int] = []

    class Counting(set[int]):
        def __contains__(self, a: object) -> bool:
            seen.append(1)
            return super().__contains__(a)

    assert _unknown_at_most(2, range(60_000), Counting()) is False
    assert len(seen) == 3  # stopped at the third unknown address
    assert _unknown_at_most(2, range(5, 7), Counting()) is True
    profile = resolve_profile("household-hybrid-forcible")
    reads = [profile.register(n) for n in profile.fields.values()]
    blocks = plan_reads(reads, max_registers=125, declared=profile.registers)
    assert [(b.address, b.count) for b in blocks] == [
        (32008, 1),
        (37758, 3),
        (37762, 1),
        (37765, 2),
        (47075, 4),
        (47081, 2),
    ]
