"""The SunSpec driver against its own image, over real loopback Modbus TCP.

Includes the interop check of issue 3: pysunspec2's own client scans the device as served and
reads the same SoC and limits as the driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    CommunicationError,
    DeviceDriver,
    DischargeLimitControl,
    HeartbeatControl,
    OutputControl,
    RevertTimerControl,
    SafeModeControl,
    SocLimitControl,
    ValueRefused,
)
from drivers.factory import EndpointPool
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Profile, ProfileError
from drivers.profile_loader import (
    list_profiles,
    load_profile,
    load_profile_text,
    shipped_profiles_dir,
)
from drivers.registers import Table
from drivers.sunspec import SunSpecDiscoveryError, SunSpecDriver, SunSpecError
from essd.clock import RealClock, SimClock
from essd.config import DeviceConfig, SerialTransport
from essd.config_loading import load_settings
from essd.domain import BatteryReading, LiveLimits, MeterReading, Quality
from essd.endpoints import build_driver
from hil_sim.store import RegisterImage, RegisterStore
from hil_sim.sunspec_image import SunSpecImage, build_sunspec_image
from tests.support.sunspec import loopback, serve_stores

PCS = shipped_profiles_dir() / "devices" / "industrial-sunspec-pcs.yaml"


@pytest.fixture(scope="module")
def pcs() -> Profile:
    return load_profile(PCS)


def healthy(img: SunSpecImage) -> SunSpecImage:
    """A connected 800 V bank at 73.4 % that may charge at 100 A and discharge at 150 A."""
    img.set_field("soc", 0.734)
    img.set_point("802.W", -25_000)
    img.set_point("802.V", 800.0)
    img.set_point("802.AChaMax", 100.0)
    img.set_point("802.ADisChaMax", 150.0)
    img.set_point("802.WChaRteMax", 100_000)
    img.set_point("802.WDisChaRteMax", 100_000)
    img.set_point("802.State", "CONNECTED")
    img.set_point("713.WHRtg", 215_000)
    img.set_point("713.SoC", 73.4)
    return img


@dataclass
class Rig:
    image: SunSpecImage
    driver: SunSpecDriver
    endpoint: ModbusEndpoint
    port: int


@pytest.fixture
async def rig(pcs: Profile) -> AsyncIterator[Rig]:
    img = healthy(build_sunspec_image(pcs))
    async with serve_stores({1: img}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=1, clock=SimClock())
        await driver.connect()
        yield Rig(img, driver, ep, port)
        await driver.close()
        await ep.close()


async def battery(driver: SunSpecDriver) -> BatteryReading:
    r = await driver.read()
    assert isinstance(r, BatteryReading)
    return r


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovery_at_each_base_address(pcs: Profile, base: int) -> None:
    img = healthy(build_sunspec_image(pcs, base_address=base))
    async with serve_stores({3: img}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=3, clock=SimClock())
        await driver.connect()
        smap = driver.sunspec_map
        assert smap is not None
        assert smap.base_address == base
        r = await battery(driver)
        assert r.soc.value == pytest.approx(0.734)
        await ep.close()


async def test_walk_finds_every_model_in_order_and_contiguous(rig: Rig, pcs: Profile) -> None:
    smap = rig.driver.sunspec_map
    assert smap is not None
    assert pcs.sunspec is not None
    assert smap.model_ids == pcs.sunspec.models
    assert smap.models[0].address == smap.base_address + 2
    for a, b in zip(smap.models, smap.models[1:], strict=False):
        assert b.address == a.end
    assert smap == rig.image.map


async def test_missing_model_is_refused_naming_it(pcs: Profile) -> None:
    assert pcs.sunspec is not None
    lacking = pcs.sunspec.model_copy(update={"models": (1, 704, 713, 802)})
    device = build_sunspec_image(pcs.model_copy(update={"sunspec": lacking}))
    async with serve_stores({1: device}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=1, clock=SimClock())
        with pytest.raises(SunSpecDiscoveryError, match=r"model\(s\) 124 required"):
            await driver.connect()
        await ep.close()


async def test_device_without_marker_is_refused(pcs: Profile) -> None:
    plain = RegisterImage()
    for base in (40000, 0, 50000):
        plain.define(Table.HOLDING, base, 4, fill=0x1234)
    async with serve_stores({1: plain}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=1, clock=SimClock())
        with pytest.raises(SunSpecDiscoveryError, match="no SunSpec 'SunS' marker"):
            await driver.connect()
        await ep.close()


async def test_reading_scales_limits_and_alarms(rig: Rig) -> None:
    r = await battery(rig.driver)
    assert r.available
    assert r.soc.value == pytest.approx(0.734)
    assert r.power_w.value == -25_000  # charging
    # charge: min(rating 100 kW, 802 WChaRteMax 100 kW, 100 A x 800 V); discharge: 150 A x 800 V
    # is above the 100 kW rating.
    assert r.limits == LiveLimits(80_000, 100_000)
    assert r.capacity_wh == 215_000
    assert r.alarms == ()
    assert r.extras["storage_soc"].value == pytest.approx(0.734)
    rig.image.set_point("802.Evt1", (1 << 1) | (1 << 20))
    rig.image.set_point("802.State", "FAULT")
    r = await battery(rig.driver)
    assert set(r.alarms) == {
        "alarms_1=OVER_TEMP_ALARM (0x2)",
        "alarms_1=CONTACTOR_ERROR (0x100000)",
        "state=FAULT (0x63)",
    }
    # A warning bit (the profile's severity) is reported, and does not fault the battery.
    rig.image.set_point("802.Evt1", 1 << 2)
    rig.image.set_point("802.State", "CONNECTED")
    r = await battery(rig.driver)
    assert r.alarms == ()
    assert r.warnings == ("alarms_1=OVER_TEMP_WARNING (0x4)",)


async def test_scale_factor_changes_are_followed(rig: Rig) -> None:
    rig.image.set_point("802.SoC_SF", -1)
    rig.image.set_point("802.SoC", 41.3)
    r = await battery(rig.driver)
    assert r.soc.value == pytest.approx(0.413)


async def test_not_implemented_values_become_invalid_readings(rig: Rig) -> None:
    rig.image.set_point("802.SoC", None)
    rig.image.set_point("802.W", None)
    rig.image.set_point("802.AChaMax", None)
    r = await battery(rig.driver)
    assert r.soc.quality is Quality.INVALID
    assert r.soc.value is None
    assert "802.SoC not implemented (0xFFFF)" in r.soc.reason
    assert r.power_w.quality is Quality.INVALID
    assert "0x8000" in r.power_w.reason
    # A declared live limit that cannot be read holds that direction at 0 W.
    assert r.limits is not None
    assert r.limits.max_charge_w == 0
    assert r.limits.max_discharge_w == 100_000


async def test_soc_outside_its_range_is_invalid(rig: Rig) -> None:
    rig.image.set_point("802.SoC", 130.0)
    r = await battery(rig.driver)
    assert r.soc.quality is Quality.INVALID
    assert "outside" in r.soc.reason


async def test_capabilities_follow_the_profile(rig: Rig) -> None:
    d = rig.driver
    assert isinstance(d, DeviceDriver)
    for proto in (
        ActivePowerControl,
        ChargeLimitControl,
        HeartbeatControl,
        RevertTimerControl,
        SafeModeControl,
        SocLimitControl,
    ):
        assert isinstance(d, proto), proto
    assert d.capability(OutputControl) is None
    assert d.capability(DischargeLimitControl) is None
    await d.read()
    assert d.counters().requests_total > 0


async def test_set_active_power_both_directions(rig: Rig) -> None:
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    res = await d.set_active_power(-42_000, duration_s=30)
    assert res.ok
    assert res.registers_written == 3
    assert rig.image.get_point("704.WSet") == -42_000
    assert rig.image.get_point("704.WSetMod") == 1  # WATTS
    assert rig.image.get_point("704.WSetEna") == 1  # ENABLED
    res = await d.set_active_power(61_234.5, duration_s=30)
    assert res.ok
    assert rig.image.get_point("704.WSet") == pytest.approx(61_234.5, abs=0.01)


async def test_out_of_range_setpoint_is_refused_and_nothing_written(rig: Rig) -> None:
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    before = rig.endpoint.stats(1).requests_total
    with pytest.raises(ValueRefused, match=r"wset_w = 150000 outside"):
        await d.set_active_power(150_000, duration_s=30)
    assert rig.endpoint.stats(1).requests_total == before
    assert rig.image.get_point("704.WSet") == 0


async def test_revert_timer_heartbeat_and_safe_mode(rig: Rig) -> None:
    d = rig.driver
    assert d.capability(RevertTimerControl) is not None
    assert d.capability(HeartbeatControl) is not None
    assert d.capability(SafeModeControl) is not None
    assert d.capability(ActivePowerControl) is not None
    assert (await d.configure_revert_timer(29.2)).ok
    assert rig.image.get_point("704.WSetRvrtTms") == 30  # rounded up, never shorter
    assert rig.image.get_point("704.WSetRvrt") == 0
    assert rig.image.get_point("704.WSetEnaRvrt") == 1
    assert (await d.heartbeat()).ok
    assert rig.image.get_point("802.CtrlHb") == 1
    assert (await d.heartbeat()).ok
    assert rig.image.get_point("802.CtrlHb") == 2
    await d.set_active_power(50_000, duration_s=30)
    res = await d.safe_mode()
    assert res.ok
    assert rig.image.get_point("704.WSet") == 0
    assert rig.image.get_point("704.WSetEna") == 0  # DISABLED


async def test_charge_and_soc_limits(rig: Rig) -> None:
    d = rig.driver
    assert d.capability(ChargeLimitControl) is not None
    assert d.capability(SocLimitControl) is not None
    assert (await d.set_charge_limit(40_000)).ok
    assert rig.image.get_point("124.WChaMax") == 40_000
    assert (await d.set_soc_limits(0.1, 0.95)).ok
    assert rig.image.get_value("soc_reserve_min") == pytest.approx(10.0)
    assert rig.image.get_value("soc_reserve_max") == pytest.approx(95.0)


async def test_read_back_mismatch_is_reported(rig: Rig) -> None:
    # The PCS clamps its setpoint to 50 kW after accepting the write.
    def clamp(points: tuple[str, ...]) -> None:
        if "704.WSet" in points:
            w = rig.image.get_point("704.WSet")
            assert isinstance(w, float | int)
            rig.image.set_point("704.WSet", max(-50_000.0, min(50_000.0, w)))

    rig.image.add_write_listener(clamp)
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    res = await d.set_active_power(80_000, duration_s=30)
    assert not res.ok
    assert len(res.mismatches) == 1
    assert "wset_w (704.WSet): wrote 80000" in res.mismatches[0]
    assert "50000" in res.mismatches[0]


async def test_conditional_steps_follow_the_sense_the_engine_is_given(pcs: Profile) -> None:
    # The same engine as the generic driver: ``when`` selects the steps, whatever power_w says.
    data = pcs.model_dump(mode="json", by_alias=True)
    data["actions"]["set_active_power"]["writes"] = [
        {"register": "wset_w", "param": "power_w"},
        {"register": "wset_mode", "value": "WATTS"},
        {"register": "wset_enable", "value": "ENABLED", "when": "charge"},
        {"register": "wset_enable", "value": "ENABLED", "when": "discharge"},
        {"register": "wset_enable", "value": "DISABLED", "when": "idle"},
    ]
    gated = Profile(**data)
    img = healthy(build_sunspec_image(gated))
    async with serve_stores({1: img}) as port:
        ep = loopback(port)
        d = SunSpecDriver(device_id="pcs1", profile=gated, endpoint=ep, unit=1, clock=SimClock())
        res = await d.set_active_power(-1_000, duration_s=30)
        assert (res.ok, res.registers_written) == (True, 3)
        assert img.get_point("704.WSetEna") == 1  # ENABLED
        await d.set_active_power(0.0, duration_s=30)
        assert img.get_point("704.WSetEna") == 0  # idle: DISABLED
        params = {"power_w": 0.0, "duration_s": 30.0}
        await d.perform(ActionName.SET_ACTIVE_POWER, params, when="discharge")
        assert img.get_point("704.WSetEna") == 1
        with pytest.raises(ValueRefused, match="parameter 'power_w' not supplied"):
            await d.perform(ActionName.SET_ACTIVE_POWER, {}, when="charge")
        await ep.close()


class Swappable:
    """A RegisterStore whose device can be replaced under a running server (a unit swap)."""

    def __init__(self, target: RegisterStore) -> None:
        self.target = target

    def read(self, table: Table, address: int, count: int) -> list[int]:
        return self.target.read(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        self.target.write(address, values)


async def test_moved_map_is_rediscovered(pcs: Profile) -> None:
    assert pcs.sunspec is not None
    store = Swappable(healthy(build_sunspec_image(pcs)))
    reordered = pcs.sunspec.model_copy(update={"models": (1, 802, 124, 713, 704)})
    async with serve_stores({1: store}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=1, clock=SimClock())
        await battery(driver)
        store.target = healthy(build_sunspec_image(pcs.model_copy(update={"sunspec": reordered})))
        # The first model in the old map (704 at 40070) now holds model 802: caught, not misread.
        with pytest.raises(
            SunSpecDiscoveryError, match="model 704 expected at 40070, found id 802"
        ):
            await driver.read()
        r = await battery(driver)
        assert r.soc.value == pytest.approx(0.734)
        smap = driver.sunspec_map
        assert smap is not None
        assert smap.model_ids == (1, 802, 124, 713, 704)
        await ep.close()


def _scan(port: int) -> dict[str, object]:
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        battery = dev.models["battery"][0]
        offsets = {
            (mid, name): point.offset
            for mid in (704, 713, 124, 802)
            for name, point in dev.models[mid][0].points.items()
        }
        return {
            "models": [m.model_id for m in dev.model_list],
            "addresses": [m.model_addr for m in dev.model_list],
            "soc": battery.SoC.cvalue,
            "w_cha": battery.WChaRteMax.cvalue,
            "w_discha": battery.WDisChaRteMax.cvalue,
            "a_cha": battery.AChaMax.cvalue,
            "a_discha": battery.ADisChaMax.cvalue,
            "v": battery.V.cvalue,
            "wset": dev.models[704][0].WSet.cvalue,
            "offsets": offsets,
        }
    finally:
        dev.close()


async def test_interop_pysunspec2_client_reads_what_the_driver_reads(
    rig: Rig, pcs: Profile
) -> None:
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    await d.set_active_power(-12_500, duration_s=30)
    ours = await battery(rig.driver)
    theirs = await asyncio.to_thread(_scan, rig.port)
    smap = rig.driver.sunspec_map
    assert smap is not None
    assert theirs["models"] == list(smap.model_ids)
    assert theirs["addresses"] == [m.address for m in smap.models]
    offsets = theirs["offsets"]
    assert isinstance(offsets, dict)
    for (mid, name), offset in offsets.items():
        assert smap.model(mid).definition.point(name).offset == offset, (mid, name)
    assert ours.soc.value == pytest.approx(float(theirs["soc"]) / 100)  # type: ignore[arg-type]
    rating = pcs.ratings
    v = float(theirs["v"])  # type: ignore[arg-type]
    charge = min(rating.max_charge_w, float(theirs["w_cha"]), float(theirs["a_cha"]) * v)  # type: ignore[arg-type]
    discharge = min(
        rating.max_discharge_w,
        float(theirs["w_discha"]),  # type: ignore[arg-type]
        float(theirs["a_discha"]) * v,  # type: ignore[arg-type]
    )
    assert ours.limits is not None
    assert ours.limits.max_charge_w == pytest.approx(charge)
    assert ours.limits.max_discharge_w == pytest.approx(discharge)
    assert theirs["wset"] == -12_500


async def test_site_meter_reads_grid_power_with_essd_sign() -> None:
    meter = load_profile(shipped_profiles_dir() / "devices" / "site-meter-sunspec.yaml")
    img = build_sunspec_image(meter)
    img.set_point("203.W", 12_340)  # importing
    img.set_point("203.TotWhImp", 1_234_567)
    async with serve_stores({240: img}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(
            device_id="grid", profile=meter, endpoint=ep, unit=None, clock=SimClock()
        )
        r = await driver.read()
        assert isinstance(r, MeterReading)
        assert r.grid_power_w.value == pytest.approx(12_340)
        img.set_point("203.W", -5_000)  # exporting
        r = await driver.read()
        assert isinstance(r, MeterReading)
        assert r.grid_power_w.value == pytest.approx(-5_000)
        img.set_point("203.W", None)
        r = await driver.read()
        assert isinstance(r, MeterReading)
        assert r.grid_power_w.quality is Quality.INVALID
        assert driver.capability(ActivePowerControl) is None
        await ep.close()


@pytest.mark.parametrize(
    "profile",
    [p for p in list_profiles() if p.driver == "sunspec"],
    ids=lambda p: p.name,
)
async def test_every_sunspec_profile_is_served_and_read_back(profile: Profile) -> None:
    img = build_sunspec_image(profile)
    # Give every mapped numeric point a distinct in-range value, then read them all back.
    expected: dict[str, float] = {}
    for i, spec in enumerate(profile.registers):
        assert spec.point is not None
        _, pdef, _ = img.map.locate(spec.point)
        if pdef.symbols or pdef.type in ("string", "bitfield16", "bitfield32"):
            continue
        lo = spec.min if spec.min is not None else 0.0
        hi = spec.max if spec.max is not None else 60.0  # fits every unit (Hz at SF -2)
        value = round(lo + (hi - lo) * (i % 7 + 1) / 10, 2)
        img.set_value(spec.name, value, check_range=False)
        stored = img.get_value(spec.name)  # quantised by the point's scale factor
        assert isinstance(stored, float | int)
        assert stored == pytest.approx(value, abs=10.0), spec.name
        expected[spec.name] = stored
    async with serve_stores({profile.transport.unit: img}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(
            device_id="dev", profile=profile, endpoint=ep, unit=None, clock=SimClock()
        )
        values = await driver.read_points()
        for name, value in expected.items():
            spec = profile.register(name)
            got = values[name].value
            assert isinstance(got, float | int), name
            assert got * spec.scale + spec.offset == pytest.approx(value), name
        await ep.close()


MPPT_PROFILE = """
schema: 1
name: mppt-sunspec-test
description: A PV/battery unit with a repeating group (model 160, two MPPT modules).
device_class: industrial
source: SunSpec model 160 (Multiple MPPT Inverter Extension), github.com/sunspec/models
driver: sunspec
sunspec: {models: [1, 160, 802]}
capabilities: [read_state]
registers:
  - {name: soc, vendor_name: "802.SoC", point: "802.SoC", scale: 0.01, unit: ratio}
  - {name: battery_power_w, vendor_name: "802.W", point: "802.W", unit: W}
  - {name: mppt2_dc_w, vendor_name: "160.module.2.DCW", point: "160.module.2.DCW", unit: W}
fields: {soc: soc, power_w: battery_power_w}
"""


def _scan_modules(port: int) -> tuple[int, float]:
    dev = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=port, timeout=2)
    try:
        dev.scan()
        mppt = dev.models[160][0]
        return len(mppt.groups["module"]), float(mppt.groups["module"][1].DCW.cvalue)
    finally:
        dev.close()


async def test_repeating_group_is_discovered_and_addressed() -> None:
    profile = load_profile_text(MPPT_PROFILE, "mppt-sunspec-test.yaml")
    img = build_sunspec_image(profile, repeats={160: 2})
    img.set_point("160.N", 2)
    img.set_point("160.module.2.DCW", 3_210)
    async with serve_stores({1: img}) as port:
        ep = loopback(port)
        driver = SunSpecDriver(
            device_id="pv", profile=profile, endpoint=ep, unit=1, clock=SimClock()
        )
        values = await driver.read_points()
        assert values["mppt2_dc_w"].value == pytest.approx(3_210)
        smap = driver.sunspec_map
        assert smap is not None
        assert smap.model(160).definition.repeats_for(smap.model(160).length) == 2
        modules, dcw = await asyncio.to_thread(_scan_modules, port)
        assert modules == 2
        assert dcw == pytest.approx(3_210)
        await ep.close()
    # An instance beyond the device's length is refused when located.
    with pytest.raises(SunSpecError, match=r"no point 'module\.3\.DCW'"):
        smap.locate("160.module.3.DCW")


async def test_example_site_sunspec_device_from_the_factory(pcs: Profile) -> None:
    settings = load_settings(Path(__file__).parents[1] / "profiles" / "sites" / "example.toml")
    (dev,) = [d for d in settings.devices if d.profile == pcs.name]
    assert not isinstance(dev.transport, SerialTransport)
    img = healthy(build_sunspec_image(pcs))
    async with serve_stores({dev.transport.unit: img}) as port:
        local = dev.model_copy(
            update={"transport": dev.transport.model_copy(update={"port": port})}
        )
        assert isinstance(local, DeviceConfig)
        pool = EndpointPool(clock=RealClock())
        try:
            driver = build_driver(local, pcs, clock=RealClock(), pool=pool)
            assert isinstance(driver, SunSpecDriver)
            assert driver.capability(ActivePowerControl) is not None
            await driver.connect()
            r = await driver.read()
            assert isinstance(r, BatteryReading)
            assert r.soc.value == pytest.approx(0.734)
            assert (await driver.set_active_power(-5_000, duration_s=30)).ok
            assert img.get_point("704.WSet") == -5_000
        finally:
            await pool.close()


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("802.NoSuchPoint", r"registers\.soc\.point: model 802 \(battery\) has no point"),
        ("999.SoC", r"registers\.soc\.point: model 999 is not in sunspec\.models"),
    ],
)
def test_profile_naming_an_unknown_point_is_refused_naming_the_field(
    point: str, message: str
) -> None:
    text = MPPT_PROFILE.replace('point: "802.SoC"', f'point: "{point}"')
    profile = load_profile_text(text, "bad.yaml")
    with pytest.raises(ProfileError, match=message):
        SunSpecDriver(
            device_id="pv", profile=profile, endpoint=loopback(1), unit=1, clock=SimClock()
        )


async def test_silent_device_is_a_communication_error(pcs: Profile) -> None:
    async with serve_stores({1: build_sunspec_image(pcs)}) as port:
        pass  # the server is gone: nothing listens on the port any more
    ep = loopback(port, timeout_s=0.2)
    driver = SunSpecDriver(device_id="pcs1", profile=pcs, endpoint=ep, unit=1, clock=SimClock())
    with pytest.raises(CommunicationError):
        await driver.connect()
    with pytest.raises(CommunicationError):
        await driver.read()
    await ep.close()


async def test_adjacent_points_go_as_one_write_and_one_read_back(rig: Rig) -> None:
    """WSetEna, WSetMod and WSet are adjacent in model 704: one function-16 write (SunSpec
    devices must take it) and one read of the three back, not three of each."""
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    await d.set_active_power(1_000, duration_s=30)  # the scale factor is read once, first
    requests: list[tuple[str, ...]] = []
    rig.image.add_write_listener(requests.append)
    before = rig.endpoint.stats(1)
    res = await d.set_active_power(-42_000, duration_s=30)
    after = rig.endpoint.stats(1)
    assert res.ok
    assert res.registers_written == 3  # three points, in one request
    assert len(requests) == 1
    assert {"704.WSetEna", "704.WSetMod", "704.WSet"} <= set(requests[0])
    assert after.writes_total - before.writes_total == 1
    assert after.requests_total - before.requests_total == 2  # the write and its read-back
    assert rig.image.get_point("704.WSet") == -42_000
    assert rig.image.get_point("704.WSetMod") == 1
    assert rig.image.get_point("704.WSetEna") == 1


async def test_a_merged_write_read_back_still_names_the_point_that_differs(rig: Rig) -> None:
    """Read back in one block, each point is still compared on its own words."""

    def refuse_mode(points: tuple[str, ...]) -> None:
        if "704.WSetMod" in points:
            rig.image.set_point("704.WSetMod", 0)

    rig.image.add_write_listener(refuse_mode)
    d = rig.driver
    assert d.capability(ActivePowerControl) is not None
    res = await d.set_active_power(20_000, duration_s=30)
    assert len(res.mismatches) == 1
    assert "704.WSetMod" in res.mismatches[0]


async def test_models_that_follow_one_another_are_read_together(rig: Rig) -> None:
    """The PCS maps points of four models that follow one another in the map (704, 713, 802
    and 124, 166 registers with their headers): two reads of at most 100 registers (the
    profile's limit), not one per model; every value as read model by model."""
    d = rig.driver
    await battery(d)  # discovery and the first read
    before = rig.endpoint.stats(1).requests_total
    reading = await battery(d)
    assert rig.endpoint.stats(1).requests_total - before == 2
    assert reading.soc.value == pytest.approx(0.734)
    assert reading.power_w.value == pytest.approx(-25_000)
