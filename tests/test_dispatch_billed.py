"""The demand charge on the billing window under way: the LP's first step plans the rest of
the clock-aligned window with what the meter already measured of it
(essd.dispatch.inputs.first_step_peak_kw)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs, InvalidDispatchInputsError
from essd.dispatch.inputs import first_step_peak_kw, validate_inputs
from essd.domain import FallbackRung, LiveLimits, Plan
from tests.support.optimizer import (
    T0,
    agrees_with_reference,
    random_fleet,
    random_inputs,
    reference_solve,
)

STEP = 900.0
H = STEP / 3600.0
STEPS = 8
PEAK_KW = 50.0
LOAD_KW = 45.0
BURST_KW = 80.0

BAT = BatterySpec(id="bat", capacity_wh=200_000.0, charge_efficiency=1.0, discharge_efficiency=1.0)


def _inputs(max_discharge_w: float, **kw: object) -> DispatchInputs:
    base: dict[str, object] = {
        "time": T0 + 300.0,  # 5 minutes into a clock-aligned 15-minute window
        "step_s": STEP,
        "soc": {"bat": 0.5},
        "limits": {"bat": LiveLimits(100_000.0, max_discharge_w)},
        "reserve_soc": {"bat": 0.1},
        "max_soc": {"bat": 1.0},
        "load_w": [LOAD_KW * 1000.0] * STEPS,
        "pv_w": [0.0] * STEPS,
        "import_price": [0.2] * STEPS,
        "export_price": [0.05] * STEPS,
        "demand_charge_per_kw": 12.0,
        "peak_import_w": PEAK_KW * 1000.0,
        # Stored energy is worth what it saves: discharging pays only against the peak.
        "terminal_value_per_kwh": 0.2,
    }
    base.update(kw)
    return DispatchInputs(**base)  # type: ignore[arg-type]


def _solve(inputs: DispatchInputs) -> Plan:
    plan = Dispatcher([BAT], STEPS).solve(inputs, budget_s=10.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    return plan


def _window_kw(so_far_wh: float, elapsed_s: float, plan: Plan) -> float:
    """The window's average import: what was measured plus the plan for the rest of it."""
    rest_s = STEP - elapsed_s
    return (so_far_wh * 3600.0 + plan.grid_w[0] * rest_s) / STEP / 1000.0


def test_the_threshold_algebra() -> None:
    # At a window's start with nothing measured: the running threshold itself.
    assert first_step_peak_kw(50.0, 0.0, 0.0, H, 1e6) == 50.0
    # A third gone at 80 kW (6.67 kWh): the rest may average (50 - 80/3) / (2/3) = 35 kW.
    assert first_step_peak_kw(50.0, 80.0 * H / 3, 1 / 3, H, 1e6) == pytest.approx(35.0)
    # Already above: the rest must import less than nothing; the threshold goes negative ...
    assert first_step_peak_kw(50.0, 60.0 * H, 1 / 3, H, 1e6) == pytest.approx(-15.0)
    # ... and is clipped to the grid's reach, as is a window about to end.
    assert first_step_peak_kw(50.0, 60.0 * H, 1 / 3, H, 10.0) == -10.0
    # Less than a third of the window ahead: the first step lies mostly in the next window,
    # planned on the running threshold as every other step.
    assert first_step_peak_kw(50.0, 60.0 * H, 0.7, H, 1e6) == 50.0
    assert first_step_peak_kw(50.0, 0.0, 1.0 - 1e-9, H, 1e6) == 50.0
    assert first_step_peak_kw(70.0, 60.0 * H, 0.9, H, 1e6, threshold_kw=50.0) == 50.0


def test_a_burst_in_the_first_third_is_made_up_in_the_rest_of_the_window() -> None:
    """80 kW in the first 5 minutes of a window billed against 50 kW: the plan for the other
    10 minutes imports at most 35 kW, so the window averages 50 kW (the battery can)."""
    so_far_wh = BURST_KW * 1000.0 * 300.0 / 3600.0
    inputs = _inputs(100_000.0, billed_import_wh=so_far_wh, billed_elapsed_s=300.0)
    plan = _solve(inputs)
    assert plan.grid_w[0] <= 35_000.0 + 1.0
    assert _window_kw(so_far_wh, 300.0, plan) <= PEAK_KW + 1e-3
    # Planned as if the whole step were ahead (what the LP did before): the window is billed
    # at (80 + 2 x 45) / 3 = 56.7 kW, above the peak the plan thought it kept.
    blind = _solve(_inputs(100_000.0))
    assert _window_kw(so_far_wh, 300.0, blind) > PEAK_KW + 5.0
    # The later steps keep the running threshold as before.
    assert max(plan.grid_w[1:]) <= PEAK_KW * 1000.0 + 1.0


def test_the_window_is_held_to_the_level_given() -> None:
    """A window may reach ``billed_peak_w`` (the peak the plan sets later anyway) at no cost:
    at 70 kW the same burst needs no discharge for the rest of it; below the running
    threshold the level is refused."""
    so_far_wh = BURST_KW * 1000.0 * 300.0 / 3600.0
    level = _inputs(
        100_000.0, billed_import_wh=so_far_wh, billed_elapsed_s=300.0, billed_peak_w=70_000.0
    )
    plan = _solve(level)
    assert plan.power_w["bat"][0] == pytest.approx(0.0, abs=1.0)
    assert _window_kw(so_far_wh, 300.0, plan) <= 70.0 + 1e-3
    with pytest.raises(InvalidDispatchInputsError, match="billed_peak_w"):
        validate_inputs([BAT], STEPS, dataclasses.replace(level, billed_peak_w=40_000.0))


def test_a_window_that_cannot_be_held_is_shaved_as_far_as_the_battery_can() -> None:
    """With 5 kW of discharge the window cannot be brought back to 50 kW: the battery gives
    all it has for the rest of it (the excess is billed, the plan does not pretend)."""
    so_far_wh = BURST_KW * 1000.0 * 300.0 / 3600.0
    plan = _solve(_inputs(5_000.0, billed_import_wh=so_far_wh, billed_elapsed_s=300.0))
    assert plan.power_w["bat"][0] == pytest.approx(5_000.0, abs=1.0)
    assert _window_kw(so_far_wh, 300.0, plan) > PEAK_KW


def test_nothing_changes_at_a_window_start() -> None:
    """A cycle at the window's start (nothing measured yet) plans exactly as before."""
    inputs = _inputs(100_000.0, time=T0)
    a = validate_inputs([BAT], STEPS, inputs)
    assert a.peak_first_kw == a.peak_kw == PEAK_KW
    plan = _solve(inputs)
    again = _solve(dataclasses.replace(inputs, billed_import_wh=0.0, billed_elapsed_s=0.0))
    assert plan.power_w == again.power_w
    # A level given for the window counts only once part of it is measured.
    lifted = _solve(dataclasses.replace(inputs, billed_peak_w=90_000.0))
    assert lifted.power_w == plan.power_w


def test_billed_inputs_are_validated() -> None:
    with pytest.raises(InvalidDispatchInputsError, match="billed_elapsed_s"):
        validate_inputs([BAT], STEPS, _inputs(1.0, billed_elapsed_s=STEP))
    with pytest.raises(InvalidDispatchInputsError, match="billed_import_wh"):
        validate_inputs([BAT], STEPS, _inputs(1.0, billed_import_wh=-1.0))
    with pytest.raises(InvalidDispatchInputsError, match="billed_elapsed_s"):
        validate_inputs([BAT], STEPS, _inputs(1.0, billed_elapsed_s=float("nan")))


def test_the_window_under_way_matches_the_reference() -> None:
    """Random instances part-way into their first billing window, with a demand charge:
    the LP's objective within 1e-4 of the scipy reference (which states the first step's
    demand charge in window form)."""
    rng = np.random.default_rng(41)
    compared = 0
    for steps, nb in ((6, 1), (24, 1), (12, 2), (24, 3)):
        fleet = random_fleet(rng, nb)
        dispatcher = Dispatcher(fleet, steps)
        for _ in range(8):
            base = random_inputs(rng, fleet, steps)
            elapsed = float(rng.choice([1.0, 2.0])) / 3.0 * base.step_s
            # The first part of the window at 0.5-3x the first step's forecast net load.
            net0 = max(0.0, base.load_w[0] - base.pv_w[0])
            so_far_wh = float(rng.uniform(0.5, 3.0)) * net0 * elapsed / 3600.0
            inputs = dataclasses.replace(
                base,
                demand_charge_per_kw=float(rng.choice([3.0, 12.0])),
                billed_import_wh=so_far_wh,
                billed_elapsed_s=elapsed,
                billed_peak_w=base.peak_import_w * float(rng.choice([1.0, 1.2])),
            )
            a = validate_inputs(fleet, steps, inputs)
            rest = 1.0 - elapsed / base.step_s
            # The clip to the grid's reach does not bind on these instances.
            level = inputs.billed_peak_w / 1000.0
            expected = level - inputs.peak_import_w / 1000.0  # the new peak set anyway
            assert a.peak_first_kw == pytest.approx(
                (level - so_far_wh / 1000.0 / a.h) / rest - expected
            )
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            compared += agrees_with_reference(plan, reference_solve(fleet, inputs))
    assert compared >= 24


def test_a_window_level_above_the_threshold_never_lets_the_window_exceed_the_plans_peak() -> None:
    """A month's start (no running peak, threshold 0 kW) at a price peak: the plan sets its
    new peak at the load; 5 minutes into a window at that level, the window's level W is the
    peak the plan sets anyway. The rest of the window must stay within that peak: counting W
    on top of the new-peak variable (as a first version of the window row did) let the window
    take twice the peak for free, and the plan charged the battery at the price peak to shave
    later steps instead."""
    expensive = [1.0] * STEPS
    start = _inputs(
        0.0,
        soc={"bat": 0.1},  # empty: shaving the later steps takes energy charged first
        peak_import_w=0.0,
        import_price=expensive,
        terminal_value_per_kwh=0.1,
    )
    first = _solve(dataclasses.replace(start, time=T0))
    planned_kw = max(first.grid_w[1:]) / 1000.0
    assert planned_kw == pytest.approx(LOAD_KW, abs=0.5)  # nothing to discharge: the load
    so_far_wh = planned_kw * 1000.0 * 300.0 / 3600.0
    plan = _solve(
        dataclasses.replace(
            start,
            limits={"bat": LiveLimits(100_000.0, 100_000.0)},
            billed_import_wh=so_far_wh,
            billed_elapsed_s=300.0,
            billed_peak_w=planned_kw * 1000.0,
        )
    )
    new_peak_kw = max(plan.grid_w[1:]) / 1000.0
    assert plan.power_w["bat"][0] >= -1.0  # no charging at the price peak
    assert _window_kw(so_far_wh, 300.0, plan) <= max(new_peak_kw, planned_kw) + 0.1
