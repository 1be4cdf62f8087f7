"""Every shipped profile: loaded, validated, laid out, served over real Modbus and read back.

Parametrized over ``profiles/devices/*.yaml``, so a new profile is covered by adding the file.
The serve-and-read-back cases here cover the plain (``driver: generic``) profiles; SunSpec
profiles are served by the SunSpec simulator and read back in the SunSpec driver's tests. Every
SunSpec profile must still find its driver: that case fails (never skips) while it is missing.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    DeviceDriver,
    DischargeLimitControl,
    HeartbeatControl,
    OutputControl,
    RevertTimerControl,
    SafeModeControl,
    SocLimitControl,
)
from drivers.layout import from_base
from drivers.profile import ActionName, Capability
from drivers.profile_loader import load_profile
from essd.domain import BatteryReading, DeviceClass, MeterReading, Quality
from hil_sim.profile_image import ProfileImage
from tests.support.devices import (
    close_enough,
    expected_fields,
    sample_image,
    serve_profile,
    shipped_profile_paths,
)

PATHS = shipped_profile_paths()
IDS = [p.stem for p in PATHS]
GENERIC = [p for p in PATHS if load_profile(p).driver == "generic"]
GENERIC_IDS = [p.stem for p in GENERIC]
SUNSPEC = [p for p in PATHS if load_profile(p).driver == "sunspec"]

PROTOCOL_OF = {
    Capability.ACTIVE_POWER: ActivePowerControl,
    Capability.CHARGE_LIMIT: ChargeLimitControl,
    Capability.DISCHARGE_LIMIT: DischargeLimitControl,
    Capability.OUTPUT_SWITCH: OutputControl,
    Capability.HEARTBEAT: HeartbeatControl,
    Capability.REVERT_TIMER: RevertTimerControl,
    Capability.SAFE_MODE: SafeModeControl,
    Capability.SOC_LIMITS: SocLimitControl,
}


def test_the_shipped_profiles_are_there() -> None:
    names = set(IDS)
    assert {
        "household-hybrid-forcible",
        "household-ess-setpoint",
        "portable-power-station",
        "site-meter",
    } <= names
    # Public maps: household hybrids, industrial PCS, a portable unit, meters.
    assert {
        "sungrow-sh-rt",
        "huawei-sun2000-luna2000",
        "goodwe-et",
        "sma-sunny-island",
        "fronius-gen24-sunspec",
        "solaredge-storedge",
        "deye-sun-sg04lp3",
        "victron-gx-ess",
        "industrial-sunspec-pcs",
        "sinexcel-pws2-30k",
        "bluetti-ac300",
        "eastron-sdm630",
        "carlo-gavazzi-em24",
        "site-meter-sunspec",
    } <= names


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_profile_loads_and_documents_every_register(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.source.strip()
    for spec in profile.registers:
        assert spec.vendor_name.strip(), spec.name
    if profile.has(Capability.READ_STATE):
        assert profile.ratings.capacity_wh > 0
    if profile.device_class is not DeviceClass.METER:
        assert profile.ratings.max_charge_w > 0


def test_every_profile_has_a_driver() -> None:
    assert len(GENERIC) + len(SUNSPEC) == len(PATHS)
    if SUNSPEC:
        # Fails, never skips, while the SunSpec driver is missing.
        module = importlib.import_module("drivers.sunspec")
        assert hasattr(module, "SunSpecDriver")


@pytest.mark.parametrize("path", GENERIC, ids=GENERIC_IDS)
async def test_profile_is_served_and_read_back(path: Path) -> None:
    profile = load_profile(path)
    image = sample_image(profile)
    expected = expected_fields(image)
    async with serve_profile(profile, image=image) as dev:
        assert isinstance(dev.driver, DeviceDriver)
        for cap, proto in PROTOCOL_OF.items():
            assert (dev.driver.capability(proto) is not None) == profile.has(cap), cap
        fields = await dev.driver.read_fields()
        assert set(fields) == set(expected)
        for name, want in expected.items():
            got = fields[name]
            if want is None or isinstance(want, str):
                assert got.quality is Quality.INVALID, name
                continue
            assert got.quality is Quality.GOOD, (name, got)
            assert close_enough(got.value, want), (name, got.value, want)
        reading = await dev.driver.read()
        if profile.device_class is DeviceClass.METER:
            assert isinstance(reading, MeterReading)
            assert reading.grid_power_w.valid
        else:
            assert isinstance(reading, BatteryReading)
            assert reading.available
            # A PCS without its BMS (sinexcel-pws2-30k) reads no SoC: it says so.
            assert reading.soc.valid == profile.has(Capability.READ_STATE)
            if reading.soc.value is not None:
                assert 0.0 <= reading.soc.value <= 1.0
            assert reading.power_w.valid
            assert reading.limits is not None
            assert reading.limits.max_charge_w <= profile.ratings.max_charge_w
            assert reading.limits.max_discharge_w <= profile.ratings.max_discharge_w
        # every block read is one request; the plan is as small as the profile allows
        before = dev.endpoint.stats(profile.transport.unit).requests_total
        await dev.driver.read()
        after = dev.endpoint.stats(profile.transport.unit).requests_total
        assert after - before == len(dev.driver.read_plan)
        assert all(
            b.count <= profile.transport.max_registers_per_read for b in dev.driver.read_plan
        )


SAMPLE_PARAMS: dict[ActionName, list[dict[str, float]]] = {
    ActionName.SET_ACTIVE_POWER: [],  # driven through set_active_power below
    ActionName.SET_CHARGE_LIMIT: [{"charge_w": 600.0}],
    ActionName.SET_DISCHARGE_LIMIT: [{"discharge_w": 700.0}],
    ActionName.ENABLE_OUTPUT: [{}],
    ActionName.DISABLE_OUTPUT: [{}],
    ActionName.HEARTBEAT: [{"counter": 7.0}],
    ActionName.CONFIGURE_REVERT_TIMER: [{"seconds": 60.0}],
    ActionName.SAFE_MODE: [{}],
    ActionName.SET_SOC_LIMITS: [{"min_soc": 0.1, "max_soc": 0.9}],
}


def _expected_register_values(
    image: ProfileImage, action: ActionName, params: dict[str, float], when: str
) -> dict[str, float | str]:
    """What each written register must hold afterwards (last write wins), register units."""
    out: dict[str, float | str] = {}
    for step in image.profile.actions[action].writes:
        if step.when not in ("always", when):
            continue
        spec = image.spec(step.register)
        if step.param is not None:
            base = params[step.param]
            if step.divide_by is not None:  # W / V = A: divided by the live field, then rounded
                divisor = image.get_field(step.divide_by)
                assert isinstance(divisor, float)
                base /= divisor
            value = from_base(base, spec.unit)
            if step.divide_by is not None and spec.rtype.value != "f32":
                value = round(value / spec.scale) * spec.scale
            if step.param in ("duration_s", "seconds"):
                value = math.ceil(value / abs(spec.scale) - 1e-9) * abs(spec.scale)
            out[spec.name] = value
        else:
            assert step.value is not None
            out[spec.name] = step.value
    return out


@pytest.mark.parametrize("path", GENERIC, ids=GENERIC_IDS)
async def test_profile_actions_write_and_read_back(path: Path) -> None:
    profile = load_profile(path)
    async with serve_profile(profile) as dev:
        done = 0
        if dev.driver.capability(ActivePowerControl) is not None:
            rated = min(profile.ratings.max_charge_w, profile.ratings.max_discharge_w)
            for target, when in (
                (0.4 * rated, "discharge"),
                (-0.3 * rated, "charge"),
                (0.0, "idle"),
            ):
                power = float(round(target))
                result = await dev.driver.set_active_power(power, duration_s=60.0)
                assert result.ok, result.mismatches
                params = {
                    "power_w": power,
                    "charge_w": max(0.0, -power),
                    "discharge_w": max(0.0, power),
                    "abs_w": abs(power),
                    "duration_s": 60.0,
                }
                want = _expected_register_values(
                    dev.image, ActionName.SET_ACTIVE_POWER, params, when
                )
                assert want, f"{profile.name}: set_active_power writes nothing when {when}"
                for name, value in want.items():
                    got = dev.image.value(name).value
                    assert close_enough(got, float(value)), (when, name, got, value)
                done += 1
        for action in profile.actions:
            if action is ActionName.SET_ACTIVE_POWER:
                continue
            for params in SAMPLE_PARAMS[action]:
                result = await dev.driver.perform(action, params)
                assert result.ok, result.mismatches
                assert result.registers_written >= 1
                for name, value in _expected_register_values(
                    dev.image, action, params, "always"
                ).items():
                    got = dev.image.value(name).value
                    assert close_enough(got, value if isinstance(value, str) else float(value))
                done += 1
        assert done == len(profile.actions) + (
            2 if ActionName.SET_ACTIVE_POWER in profile.actions else 0
        )
        counters = dev.driver.counters()
        assert counters.writes_total >= done
        assert counters.readback_mismatches_total == 0
        assert counters.errors_total == {}
