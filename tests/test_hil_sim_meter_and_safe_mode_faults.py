"""The meter and safe-mode fault kinds (meter_glitch, meter_drift, safe_mode_ignored), observed
by the daemon's own drivers over loopback Modbus on a stepped clock."""

from __future__ import annotations

import pytest

from drivers.api import ActivePowerControl, SafeModeControl
from essd.clock import SimClock
from essd.domain import MeterReading
from hil_sim.faults import FaultError, FaultSpec, load_faults_text
from hil_sim.runner import SimulatedSite
from tests.support.hil_sim import example_settings, simulated_example, site_drivers


def fault(kind: str, device: str, **kw: object) -> FaultSpec:
    """A fault starting 10 s into the run."""
    return FaultSpec.model_validate({"kind": kind, "device": device, "at": 10, **kw})


def step(sim: SimulatedSite, clock: SimClock, seconds: float) -> None:
    """Move the stepped clock and let the site apply what became due."""
    clock.advance(seconds)
    sim.truth()


async def grid_reading(drivers: dict[str, object]) -> float:
    """The meter's grid power as the daemon's driver reads it (W, > 0 imports)."""
    drv = drivers["meter"]
    reading = await drv.read()  # type: ignore[attr-defined]
    assert isinstance(reading, MeterReading)
    assert reading.grid_power_w.valid
    assert reading.grid_power_w.value is not None
    return float(reading.grid_power_w.value)


async def test_meter_glitch_reports_a_wrong_value_in_range_while_the_grid_is_unchanged() -> None:
    clock = SimClock()
    glitch = fault("meter_glitch", "meter", duration=60, value_w=-500_000)
    async with simulated_example(clock, faults=[glitch]) as sim, site_drivers(sim, clock) as d:
        before = await grid_reading(d)  # type: ignore[arg-type]
        step(sim, clock, 10)
        truth = sim.truth().grid_w
        seen = await grid_reading(d)  # type: ignore[arg-type]
        assert seen == pytest.approx(-500_000, abs=600)  # the meter's wobble, not the truth
        assert truth == pytest.approx(before, abs=5_000)  # the site did not change
        step(sim, clock, 60)
        assert await grid_reading(d) == pytest.approx(sim.truth().grid_w, abs=600)  # type: ignore[arg-type]


async def test_meter_drift_leaves_the_truth_at_its_rate_then_reads_true_again() -> None:
    clock = SimClock()
    drift = fault("meter_drift", "meter", duration=600, drift_w_per_s=50)
    async with simulated_example(clock, faults=[drift]) as sim, site_drivers(sim, clock) as d:
        step(sim, clock, 10)
        step(sim, clock, 300)
        error = await grid_reading(d) - sim.truth().grid_w  # type: ignore[arg-type]
        assert error == pytest.approx(50 * 300, abs=600)
        step(sim, clock, 300)
        error = await grid_reading(d) - sim.truth().grid_w  # type: ignore[arg-type]
        assert error == pytest.approx(0, abs=600)


async def test_safe_mode_ignored_acknowledges_the_safe_mode_and_keeps_discharging() -> None:
    clock = SimClock()
    ignore = fault("safe_mode_ignored", "home-a", duration=600)
    async with simulated_example(clock, faults=[ignore]) as sim, site_drivers(sim, clock) as d:
        drv = d["home-a"]
        assert drv.capability(ActivePowerControl) is not None
        assert drv.capability(SafeModeControl) is not None
        step(sim, clock, 10)
        await drv.set_active_power(4_000.0, duration_s=300)  # not the safe mode: taken
        step(sim, clock, 1)
        assert sim.truth().batteries["home-a"].power_w == pytest.approx(4_000, abs=50)
        result = await drv.safe_mode()  # answered without an exception...
        assert not result.ok  # ...but the read-back shows it was not taken
        step(sim, clock, 60)
        assert sim.truth().batteries["home-a"].power_w == pytest.approx(4_000, abs=50)
        # Its own timer (the forcible period) still ends the command.
        step(sim, clock, 300)
        assert sim.truth().batteries["home-a"].power_w == 0.0


async def test_safe_mode_ignored_leaves_a_power_setpoint_of_zero_working() -> None:
    # The SunSpec PCS's safe mode writes 0 W first, then disables the setpoint function: the
    # disable is refused, the 0 W (a power value, not the mode) is taken.
    clock = SimClock()
    ignore = fault("safe_mode_ignored", "pcs1", duration=600)
    async with simulated_example(clock, faults=[ignore]) as sim, site_drivers(sim, clock) as d:
        drv = d["pcs1"]
        assert drv.capability(ActivePowerControl) is not None
        assert drv.capability(SafeModeControl) is not None
        step(sim, clock, 10)
        await drv.set_active_power(30_000.0, duration_s=600)
        step(sim, clock, 1)
        assert sim.truth().batteries["pcs1"].power_w == pytest.approx(30_000, abs=300)
        result = await drv.safe_mode()
        assert not result.ok
        step(sim, clock, 1)
        assert sim.truth().batteries["pcs1"].power_w == 0.0


def test_new_kinds_are_validated_naming_the_file_and_field() -> None:
    cases = {
        "faults: [{kind: meter_glitch, device: meter, at: 0, duration: 1m}]": (
            r"f\.yaml: faults\.0: value_w: required for kind meter_glitch"
        ),
        "faults: [{kind: meter_drift, device: meter, at: 0, duration: 1m, value_w: 3}]": (
            r"faults\.0: value_w: only for kind meter_glitch"
        ),
        "faults: [{kind: comm_loss, device: meter, at: 0, duration: 1m, drift_w_per_s: 3}]": (
            r"faults\.0: drift_w_per_s: only for kind meter_drift"
        ),
        "faults: [{kind: meter_glitch, device: meter, at: 0, duration: 1m, value_w: .nan}]": (
            r"faults\.0\.value_w"
        ),
        "faults: [{kind: meter_drift, device: meter, at: 0, duration: 1m, drift_w_per_s: 0}]": (
            r"faults\.0: drift_w_per_s: must not be 0"
        ),
        "faults: [{kind: safe_mode_ignored, device: pcs1, at: 0}]": (
            r"faults\.0: duration: must be > 0 for kind safe_mode_ignored"
        ),
    }
    for text, message in cases.items():
        with pytest.raises(FaultError, match=message):
            load_faults_text(text, "f.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "faults: [{kind: meter_glitch, device: pcs1, at: 0, duration: 1, value_w: 5}]",
            r"faults\.0\.kind: meter_glitch needs a meter, not industrial",
        ),
        (
            "faults: [{kind: meter_drift, device: home-a, at: 0, duration: 1, drift_w_per_s: 5}]",
            r"faults\.0\.kind: meter_drift needs a meter",
        ),
        (
            "faults: [{kind: safe_mode_ignored, device: meter, at: 0, duration: 1}]",
            r"faults\.0\.kind: safe_mode_ignored needs a unit with a safe mode",
        ),
        (
            "faults: [{kind: meter_glitch, device: meter, at: 0, duration: 1, value_w: 7.0e5}]",
            r"f: faults\.0\.value_w: 700000 W is outside the meter's register range",
        ),
    ],
)
def test_new_kinds_need_a_device_that_can_have_them(text: str, message: str) -> None:
    faults = load_faults_text(text, "f")
    with pytest.raises(FaultError, match=message):
        SimulatedSite(example_settings(), clock=SimClock(), faults=faults, faults_source="f")
