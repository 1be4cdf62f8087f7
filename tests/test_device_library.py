"""The device library, one profile at a time: loaded, served by ``hil_sim``, read by essd's own
driver over a real socket, every action written with read-back, and every documented state and
alarm value of the profile decoded to its severity (only ``fault`` faults the device).

Parametrized over every shipped profile, so a new profile is covered by adding its file. The
vendor-documented severities below are checked on top of the profile's own maps, so a profile
cannot quietly demote a documented fault.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    DeviceDriver,
    DischargeLimitControl,
    OutputControl,
    RevertTimerControl,
    SafeModeControl,
    SocLimitControl,
    WriteResult,
)
from drivers.factory import EndpointPool
from drivers.profile import Capability, Profile
from drivers.profile_loader import load_profile, shipped_profiles_dir
from drivers.profile_parts import Severity
from essd.cli import main
from essd.clock import SimClock
from essd.config import Settings
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.domain import BatteryReading, DeviceState, MeterReading
from essd.events import EventBus
from hil_sim.devices.storage import StorageDevice
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from hil_sim.sunspec_image import SunSpecImage
from tests.support.hil_sim import site_drivers

PATHS = sorted((shipped_profiles_dir() / "devices").glob("*.yaml"))

# (profile, register, raw value) -> severity, as the vendor documents it.
DOCUMENTED: dict[tuple[str, str, int], Severity] = {
    ("sungrow-sh-rt", "system_state", 0x0040): Severity.INFO,  # Running
    ("sungrow-sh-rt", "system_state", 0x0100): Severity.FAULT,  # Fault
    ("sungrow-sh-rt", "system_state", 0x0002): Severity.WARNING,  # Stop
    ("huawei-sun2000-luna2000", "running_status", 2): Severity.INFO,  # running
    ("huawei-sun2000-luna2000", "running_status", 3): Severity.FAULT,  # fault
    ("huawei-sun2000-luna2000", "device_status", 0x0300): Severity.FAULT,  # Shutdown: fault
    ("sma-sunny-island", "health", 307): Severity.INFO,  # Ok
    ("sma-sunny-island", "health", 455): Severity.WARNING,  # Warning (Wrn)
    ("sma-sunny-island", "health", 35): Severity.FAULT,  # Fault (Alm)
    ("victron-gx-ess", "state", 2): Severity.FAULT,  # Fault
    ("victron-gx-ess", "state", 252): Severity.INFO,  # External control
    ("solaredge-storedge", "battery_status", 5): Severity.FAULT,  # Fault
    ("deye-sun-sg04lp3", "running_status", 4): Severity.FAULT,  # Fault
    ("sinexcel-pws2-30k", "status_word", 1 << 0): Severity.FAULT,  # Fault status
    ("sinexcel-pws2-30k", "status_word", 1 << 1): Severity.WARNING,  # Alert status
    ("industrial-sunspec-pcs", "battery_state", 99): Severity.FAULT,  # 802 FAULT
    ("industrial-sunspec-pcs", "battery_events_1", 1 << 1): Severity.FAULT,  # OVER_TEMP_ALARM
    ("industrial-sunspec-pcs", "battery_events_1", 1 << 2): Severity.WARNING,  # ..._WARNING
}


def _settings(profile: Profile) -> Settings:
    kind = "rtu-over-tcp" if profile.transport.framing == "rtu" else "tcp"
    device: dict[str, object] = {
        "id": "dut",
        "profile": profile.name,
        "transport": {"kind": kind, "host": "127.0.0.1", "port": 1502,
                      "unit": profile.transport.unit},
    }  # fmt: skip
    if profile.ratings.capacity_wh == 0:
        device["capacity_wh"] = 50_000.0  # a PCS: the battery behind it is the site's
    return Settings(
        site={
            "id": "one",
            "timezone": "UTC",
            "grid_import_limit_w": 1e5,
            "grid_export_limit_w": 1e5,
        },
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[device],
    )


def _documented_values(profile: Profile) -> list[tuple[str, int, Severity]]:
    """(register, raw, severity) for every value the profile's maps list, one bit at a time."""
    out = []
    for spec in profile.registers:
        if spec.name not in profile.fields.values():
            continue
        for key, meaning in (spec.enum or {}).items():
            out.append((spec.name, key, meaning.severity))
        for bit, meaning in (spec.bits or {}).items():
            out.append((spec.name, 1 << bit, meaning.severity))
    return out


async def _run_actions(profile: Profile, driver: DeviceDriver) -> list[WriteResult]:
    """Every action the profile has, through the driver's capability methods."""
    r = profile.ratings
    results: list[WriteResult] = []
    if (timer := driver.capability(RevertTimerControl)) is not None:
        results.append(await timer.configure_revert_timer(60.0))
    if (window := driver.capability(SocLimitControl)) is not None:
        results.append(await window.set_soc_limits(0.1, 0.95))
    if (charge := driver.capability(ChargeLimitControl)) is not None:
        results.append(await charge.set_charge_limit(0.5 * r.max_charge_w))
    if (discharge := driver.capability(DischargeLimitControl)) is not None:
        results.append(await discharge.set_discharge_limit(0.5 * r.max_discharge_w))
    if (outputs := driver.capability(OutputControl)) is not None:
        results.append(await outputs.set_output(False))
        results.append(await outputs.set_output(True))
    if (power := driver.capability(ActivePowerControl)) is not None:
        for watts in (-0.2 * r.max_charge_w, 0.0, 0.2 * r.max_discharge_w):
            results.append(await power.set_active_power(watts, duration_s=60.0))
    if (safe := driver.capability(SafeModeControl)) is not None:
        results.append(await safe.safe_mode())
    return results


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
async def test_profile_is_served_read_written_and_its_states_decoded(path: Path) -> None:
    profile = load_profile(path)
    clock = SimClock()
    async with (
        SimulatedSite(_settings(profile), clock=clock, free_ports=True) as sim,
        site_drivers(sim, clock) as drivers,
    ):
        driver = drivers["dut"]
        reading = await driver.read()
        if profile.device_class.value == "meter":
            assert isinstance(reading, MeterReading)
            assert reading.grid_power_w.valid
            return
        assert isinstance(reading, BatteryReading)
        assert reading.power_w.valid, reading.power_w.reason
        assert reading.soc.valid == profile.has(Capability.READ_STATE)
        assert reading.alarms == ()  # a healthy simulated unit
        # Every action, every write read back.
        results = await _run_actions(profile, driver)
        assert results or not profile.actions
        for result in results:
            assert result.mismatches == (), (result.action, result.mismatches)
        # The charge command reached the simulated battery (where essd commands power).
        dev = sim.device("dut")
        assert isinstance(dev, StorageDevice)
        if (power := driver.capability(ActivePowerControl)) is not None:
            await power.set_active_power(-0.2 * profile.ratings.max_charge_w, duration_s=60.0)
            truth = dev.true_state()
            assert truth.power_w == pytest.approx(-0.2 * profile.ratings.max_charge_w, rel=0.02)
            if (safe := driver.capability(SafeModeControl)) is not None:
                await safe.safe_mode()
        # Every documented state and alarm value, decoded to its severity.
        dev.faults.frozen = True  # the unit stops publishing: the test sets the registers
        image = dev.image
        for register, raw, severity in _documented_values(profile):
            want = DOCUMENTED.get((profile.name, register, raw))
            if want is not None:
                assert severity is want, (register, raw)
            spec = profile.register(register)
            if isinstance(image, ProfileImage):
                previous = image.get_raw(register)
                image.set_raw(register, raw)
            else:
                assert isinstance(image, SunSpecImage)
                assert spec.point is not None
                previous = image.get_point(spec.point)
                image.set_point(spec.point, raw)
            reading = await driver.read()
            assert isinstance(reading, BatteryReading)
            field = next(f for f, reg in profile.fields.items() if reg == register)
            in_alarms = any(a.startswith(f"{field}=") for a in reading.alarms)
            in_warnings = any(w.startswith(f"{field}=") for w in reading.warnings)
            assert in_alarms == (severity is Severity.FAULT), (register, hex(raw), reading.alarms)
            assert in_warnings == (severity is Severity.WARNING), (register, hex(raw))
            if isinstance(image, ProfileImage):
                image.set_raw(register, previous)
            elif spec.point is not None and previous is not None:
                image.set_point(spec.point, previous)
    for key in DOCUMENTED:
        assert key[0] in {p.stem for p in PATHS}, key


def test_check_config_warns_once_per_device_that_can_be_forced_without_revert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [
        "sungrow-sh-rt",  # forced mode, no timeout documented: warned
        "goodwe-et",  # EMS mode, no timeout documented: warned
        "huawei-sun2000-luna2000",  # forcible period
        "sma-sunny-island",  # Modbus timeout
        "solaredge-storedge",  # remote-control timeout (configurable)
        "victron-gx-ess",  # setpoint watchdog
        "bluetti-ac300",  # nothing essd can force
    ]
    devices = "".join(
        f'[[devices]]\nid = "d{i}"\nprofile = "{n}"\n'
        f'transport = {{ kind = "tcp", host = "192.0.2.{10 + i}", port = 502, unit = 1 }}\n'
        for i, n in enumerate([*names, "eastron-sdm630"])
    )
    path = tmp_path / "site.toml"
    path.write_text(
        '[site]\nid = "s"\ntimezone = "UTC"\ngrid_import_limit_w = 1e5\n'
        'grid_export_limit_w = 0\n[tariff]\ncurrency = "EUR"\nimport_price_per_kwh = 0.3\n'
        + devices
    )
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "neither a revert timer nor a heartbeat" in line]
    assert len(warned) == 2, err
    assert "devices.0: device d0 (sungrow-sh-rt)" in warned[0]
    assert "the public map leaves unknown: whether a forced charge/discharge ends" in warned[0]
    assert "devices.1: device d1 (goodwe-et)" in warned[1]


async def test_simulator_holds_an_undocumented_forced_mode_and_reverts_a_documented_one() -> None:
    """The conservative case: without a documented timeout the simulated unit keeps charging
    after essd stops writing; with one (Huawei's forcible period) it stops by itself."""
    held, reverted = "sungrow-sh-rt", "huawei-sun2000-luna2000"
    for name in (held, reverted):
        profile = load_profile(shipped_profiles_dir() / "devices" / f"{name}.yaml")
        clock = SimClock()
        async with (
            SimulatedSite(_settings(profile), clock=clock, free_ports=True) as sim,
            site_drivers(sim, clock) as drivers,
        ):
            driver = drivers["dut"].capability(ActivePowerControl)
            assert driver is not None
            await driver.set_active_power(-1000.0, duration_s=60.0)
            dev = sim.device("dut")
            assert isinstance(dev, StorageDevice)
            assert dev.true_state().power_w == pytest.approx(-1000.0)
            clock.advance(2 * 3600.0)  # essd is gone: nothing is written for two hours
            power = dev.true_state().power_w
        if name == held:
            assert power == pytest.approx(-1000.0)
        else:
            assert power == 0.0


async def test_a_warning_state_keeps_the_device_running_and_a_fault_state_faults_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sungrow's "Stop" (0x0002) is a warning: logged once, the inverter stays under control.
    Its "Fault" (0x0100) faults it. Through the daemon's own cycle."""
    devices = "".join(
        f'[[devices]]\nid = "{i}"\nprofile = "{n}"\n'
        f'transport = {{ kind = "tcp", host = "127.0.0.1", port = {p}, unit = 1 }}\n'
        for i, n, p in (("inv", "sungrow-sh-rt", 15991), ("meter", "eastron-sdm630", 15992))
    )
    path = tmp_path / "site.toml"
    path.write_text(
        '[site]\nid = "s"\ntimezone = "UTC"\ngrid_import_limit_w = 1e5\n'
        'grid_export_limit_w = 1e5\n[tariff]\ncurrency = "EUR"\nimport_price_per_kwh = 0.3\n'
        + devices
    )
    clock = SimClock(1_767_225_600.0)
    async with SimulatedSite(load_settings(path), clock=clock, free_ports=True) as sim:
        pool = EndpointPool(clock=clock)
        ctl = build_controller(sim.settings, clock=clock, bus=EventBus(), pool=pool)
        try:
            for _ in range(2):
                event = await ctl.run_cycle()
                clock.advance(10)
            assert event.device_states["inv"] is DeviceState.RUNNING
            dev = sim.storage("inv")
            dev.faults.frozen = True
            image = dev.image
            assert isinstance(image, ProfileImage)
            image.set_raw("system_state", 0x0002)  # Stop: a warning
            with caplog.at_level(logging.WARNING, logger="essd.devices"):
                for _ in range(3):
                    event = await ctl.run_cycle()
                    clock.advance(10)
            assert event.device_states["inv"] is DeviceState.RUNNING
            assert event.snapshot.batteries["inv"].warnings == ("system_state=Stop (0x2)",)
            logged = [r.getMessage() for r in caplog.records if "warning:" in r.getMessage()]
            assert logged == ["device inv: warning: system_state=Stop (0x2)"]  # once
            image.set_raw("system_state", 0x0100)  # Fault
            event = await ctl.run_cycle()
            assert event.device_states["inv"] is DeviceState.FAULT
        finally:
            await pool.close()
