"""The fallback ladder, the rule-based and idle planners, and never-infeasible inputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from essd.dispatch import (
    BatterySpec,
    Dispatcher,
    DispatchInputs,
    rule_based_plan,
    safe_idle_plan,
)
from essd.domain import FallbackRung, LiveLimits, Plan
from tests.support.optimizer import T0, random_fleet, random_inputs, simulate_soc

HOUR = 3600.0
STEPS = 8
HOME = BatterySpec(id="home", capacity_wh=10_000.0, degradation_cost_per_kwh=0.02)
PORTABLE = BatterySpec(id="portable", capacity_wh=1_000.0, can_discharge=False)
FLEET = (HOME, PORTABLE)


def day(**kw: object) -> DispatchInputs:
    base: dict[str, object] = {
        "time": T0,
        "step_s": HOUR,
        "soc": {"home": 0.5, "portable": 0.5},
        "limits": {"home": LiveLimits(3e3, 3e3), "portable": LiveLimits(300.0, 0.0)},
        "reserve_soc": {"home": 0.1, "portable": 0.0},
        "max_soc": {"home": 0.9, "portable": 1.0},
        "load_w": [800.0] * STEPS,
        "pv_w": [0.0, 0.0, 3e3, 4e3, 4e3, 3e3, 0.0, 0.0],
        "import_price": [0.3] * STEPS,
        "export_price": [0.05] * STEPS,
        "terminal_value_per_kwh": 0.1,
    }
    base.update(kw)
    return DispatchInputs(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dispatcher() -> Dispatcher:
    return Dispatcher(FLEET, STEPS, step_s=HOUR)


def test_rung_1_optimal(dispatcher: Dispatcher) -> None:
    """Normal inputs: solved within budget, no slack."""
    plan = dispatcher.solve(day(), budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert plan.reason == "optimal"
    assert plan.slack == {}
    assert 0 < plan.solve_s < 5.0
    assert len(plan.grid_w) == STEPS
    assert all(len(s) == STEPS + 1 for s in plan.soc.values())
    # grid = load - pv - battery power (battery > 0 discharges, grid > 0 imports)
    inputs = day()
    for t in range(STEPS):
        batt = sum(plan.power_w[d][t] for d in plan.device_ids)
        assert plan.grid_w[t] == pytest.approx(inputs.load_w[t] - inputs.pv_w[t] - batt, abs=1e-3)


def test_rung_2_soft_import_limit_and_low_soc(dispatcher: Dispatcher) -> None:
    """Load above the import limit and a SoC below reserve: solved, slack published."""
    inputs = day(
        load_w=[9e3] * STEPS,
        pv_w=[0.0] * STEPS,
        import_limit_w=4e3,
        soc={"home": 0.02, "portable": 0.5},
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.SOFT
    assert "import_limit_w" in plan.reason
    # 9 kW load, 4 kW import limit; home is below reserve so gives nothing: 5 kW uncovered.
    assert plan.slack["import_limit_w"] == pytest.approx(5e3, rel=1e-6)
    assert plan.slack["reserve_soc[home]"] == pytest.approx(0.08)
    # Below reserve it never sinks lower, and with no import headroom it cannot climb back.
    assert all(s >= 0.02 - 1e-9 for s in plan.soc["home"])
    # With headroom it climbs back at once, without breaking the import limit to do so.
    roomy = dataclasses.replace(inputs, load_w=[2e3] * STEPS)
    plan = dispatcher.solve(roomy, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.SOFT
    assert set(plan.slack) == {"reserve_soc[home]"}
    assert plan.power_w["home"][0] < 0
    assert plan.soc["home"][1] == pytest.approx(0.1)
    assert max(plan.grid_w) <= 4e3 + 1e-3


def test_rung_2_soc_above_max_comes_down(dispatcher: Dispatcher) -> None:
    """A SoC above max (e.g. max lowered by a command) is soft too: it comes down at once."""
    plan = dispatcher.solve(day(soc={"home": 0.97, "portable": 0.5}), budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.SOFT
    assert plan.slack["max_soc[home]"] == pytest.approx(0.07)
    assert plan.power_w["home"][0] > 0
    assert max(plan.soc["home"][1:]) <= 0.97


def test_rung_3_last_plan_shifted_on_timeout(dispatcher: Dispatcher) -> None:
    """A solve over budget falls back to the last plan, shifted to now."""
    first = dispatcher.solve(day(), budget_s=5.0, last_plan=None)
    later = day(time=T0 + 2 * HOUR + 60.0)
    plan = dispatcher.solve(later, budget_s=1e-9, last_plan=first)
    assert plan.rung is FallbackRung.LAST_PLAN
    assert plan.reason.startswith("solver timeout after ")
    assert "last plan shifted" in plan.reason
    assert plan.created_at == T0 + 2 * HOUR
    assert plan.power_w["home"] == first.power_w["home"][2:]


def test_rung_3_on_solver_error() -> None:
    """A solver that fails outright also ends on a lower rung, with the error as reason."""
    broken = Dispatcher(
        FLEET, STEPS, step_s=HOUR, hot_start=False, solver_options={"no_such_option": 1}
    )
    good = Dispatcher(FLEET, STEPS, step_s=HOUR).solve(day(), budget_s=5.0, last_plan=None)
    plan = broken.solve(day(time=T0 + 60.0), budget_s=5.0, last_plan=good)
    assert plan.rung is FallbackRung.LAST_PLAN
    assert plan.reason.startswith("solver error")


def test_rung_4_rule_based_without_last_plan(dispatcher: Dispatcher) -> None:
    """No last plan (or an expired one): rule-based self-consumption."""
    plan = dispatcher.solve(day(), budget_s=1e-9, last_plan=None)
    assert plan.rung is FallbackRung.RULE_BASED
    assert "no last plan" in plan.reason
    stale = dispatcher.solve(day(), budget_s=5.0, last_plan=None)
    expired = dispatcher.solve(day(time=T0 + STEPS * HOUR), budget_s=1e-9, last_plan=stale)
    assert expired.rung is FallbackRung.RULE_BASED
    assert "last plan expired" in expired.reason


def test_rung_4_ignores_a_last_plan_that_was_not_optimized(dispatcher: Dispatcher) -> None:
    """A rule-based plan is not 'the last valid plan' to fall back on."""
    rule = dispatcher.solve(day(), budget_s=1e-9, last_plan=None)
    again = dispatcher.solve(day(time=T0 + 60.0), budget_s=1e-9, last_plan=rule)
    assert again.rung is FallbackRung.RULE_BASED


def test_rung_5_safe_idle_when_rules_fail() -> None:
    """When even the rule-based planner fails, every device idles."""

    def broken(batteries: Sequence[BatterySpec], inputs: DispatchInputs) -> Plan:
        raise RuntimeError("rule table missing")

    dispatcher = Dispatcher(FLEET, STEPS, step_s=HOUR, fallback_planner=broken)
    plan = dispatcher.solve(day(), budget_s=1e-9, last_plan=None)
    assert plan.rung is FallbackRung.SAFE_IDLE
    assert "rule table missing" in plan.reason
    assert all(p == 0.0 for powers in plan.power_w.values() for p in powers)
    assert plan.soc["home"] == (0.5,) * (STEPS + 1)
    assert plan.grid_w[3] == pytest.approx(800.0 - 4e3)


def test_rule_based_self_consumption() -> None:
    """Discharge to cover load, charge from surplus only, within limits and SoC window."""
    inputs = day(soc={"home": 0.12, "portable": 0.99})
    plan = rule_based_plan(FLEET, inputs)
    assert plan.rung is FallbackRung.RULE_BASED
    home = plan.power_w["home"]
    # Night: covers the 800 W load until reserve (0.1) is reached: 200 Wh at most.
    assert 0 < home[0] <= 800.0
    assert plan.soc["home"][2] >= 0.1 - 1e-9
    # Midday surplus: charging, never importing to charge.
    assert home[3] < 0
    assert all(g >= -1e-6 or inputs.pv_w[t] > 0 for t, g in enumerate(plan.grid_w))
    assert all(p <= 0 for p in plan.power_w["portable"])
    assert max(plan.soc["portable"]) <= 1.0 + 1e-9
    for spec in FLEET:
        honest = simulate_soc(spec, inputs.soc[spec.id], plan.power_w[spec.id], HOUR)
        assert plan.soc[spec.id] == pytest.approx(honest, abs=1e-9)


def test_rule_based_plan_takes_negative_net_load() -> None:
    """Net load with pv 0 (negative at midday) plans as the same site with PV given apart."""
    split = day(soc={"home": 0.12, "portable": 0.5})
    net = [ld - pv for ld, pv in zip(split.load_w, split.pv_w, strict=True)]
    assert min(net) < 0
    inputs = dataclasses.replace(split, load_w=net, pv_w=[0.0] * STEPS)
    plan = rule_based_plan(FLEET, inputs)
    assert plan.rung is FallbackRung.RULE_BASED
    assert plan.power_w == rule_based_plan(FLEET, split).power_w
    # Surplus steps charge and never import; the rest is covered down to reserve.
    for t, n in enumerate(net):
        if n < 0:
            assert plan.power_w["home"][t] < 0
            assert plan.grid_w[t] <= 1e-6
    assert min(plan.soc["home"]) >= 0.1 - 1e-9
    # The ladder reaches it too when the solve runs out of budget.
    dispatcher = Dispatcher(FLEET, STEPS, step_s=HOUR)
    fallen = dispatcher.solve(inputs, budget_s=1e-9, last_plan=None)
    assert fallen.rung is FallbackRung.RULE_BASED
    assert fallen.power_w == plan.power_w


def test_safe_idle_without_inputs() -> None:
    """Safe idle needs nothing but ids and the horizon; unknown values are NaN."""
    plan = safe_idle_plan(["a", "b"], time=T0, step_s=900.0, steps=4)
    assert plan.rung is FallbackRung.SAFE_IDLE
    assert plan.power_w == {"a": (0.0,) * 4, "b": (0.0,) * 4}
    assert all(math.isnan(s) for s in plan.soc["a"])
    assert plan.first_step_w("b") == 0.0


# -- random valid inputs never make the problem infeasible --------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
power = st.floats(min_value=0.0, max_value=50e3)
ratio = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def valid_inputs(draw: st.DrawFn) -> DispatchInputs:
    def series(elem: st.SearchStrategy[float]) -> list[float]:
        return draw(st.lists(elem, min_size=STEPS, max_size=STEPS))

    reserve = {d: draw(ratio) for d in ("home", "portable")}
    return DispatchInputs(
        time=T0,
        step_s=HOUR,
        soc={d: draw(ratio) for d in ("home", "portable")},
        limits={d: LiveLimits(draw(power), draw(power)) for d in ("home", "portable")},
        reserve_soc=reserve,
        max_soc={d: draw(st.floats(min_value=reserve[d], max_value=1.0)) for d in reserve},
        load_w=series(power),
        pv_w=series(power),
        import_price=series(st.floats(min_value=-1.0, max_value=2.0)),
        export_price=series(st.floats(min_value=-1.0, max_value=2.0)),
        availability={
            d: draw(st.lists(st.booleans(), min_size=STEPS, max_size=STEPS))
            for d in ("home", "portable")
            if draw(st.booleans())
        },
        carbon_intensity=series(st.floats(min_value=0.0, max_value=1.0)),
        carbon_price_per_kg=draw(st.floats(min_value=0.0, max_value=1.0)),
        demand_charge_per_kw=draw(st.floats(min_value=0.0, max_value=50.0)),
        peak_import_w=draw(power),
        import_limit_w=draw(st.one_of(st.just(math.inf), power)),
        export_limit_w=draw(st.one_of(st.just(math.inf), st.just(0.0), power)),
        previous_setpoint_w={"home": draw(st.floats(min_value=-50e3, max_value=50e3))},
        terminal_soc={"home": draw(ratio)} if draw(st.booleans()) else {},
        terminal_value_per_kwh=draw(st.floats(min_value=0.0, max_value=1.0)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=valid_inputs())
def test_random_valid_inputs_always_solve_within_limits(inputs: DispatchInputs) -> None:
    """Any valid inputs solve (rung 1 or 2) and the plan keeps every device limit."""
    plan = _SHARED.solve(inputs, budget_s=30.0, last_plan=None)
    assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
    for spec in FLEET:
        lim = inputs.limits[spec.id]
        avail = inputs.availability.get(spec.id, [True] * STEPS)
        powers = plan.power_w[spec.id]
        tol = 1e-6 * max(1.0, lim.max_charge_w, lim.max_discharge_w)
        for p, here in zip(powers, avail, strict=True):
            assert -lim.max_charge_w - tol <= p <= lim.max_discharge_w + tol
            assert here or abs(p) <= tol
            assert spec.can_discharge or p <= tol
        soc = plan.soc[spec.id]
        honest = simulate_soc(spec, inputs.soc[spec.id], powers, HOUR)
        assert soc == pytest.approx(honest, abs=1e-6)
        lo = min(inputs.reserve_soc[spec.id], inputs.soc[spec.id]) - 1e-6
        hi = max(inputs.max_soc[spec.id], inputs.soc[spec.id]) + 1e-6
        assert all(lo <= s <= hi for s in soc)
    assert all(np.isfinite(plan.grid_w))
    assert math.isfinite(plan.objective)


_SHARED = Dispatcher(FLEET, STEPS, step_s=HOUR)


def test_step_length_change_builds_a_second_model(dispatcher: Dispatcher) -> None:
    """Inputs with another step length are solved too (one compiled model per length)."""
    plan = dispatcher.solve(dataclasses.replace(day(), step_s=900.0), budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert plan.step_s == 900.0


def test_time_limited_solve_goes_on_next_cycle() -> None:
    """A solve cut short by the budget falls back; the next cycle still finds the optimum."""
    rng = np.random.default_rng(5)
    fleet = random_fleet(rng, 20)
    inputs = random_inputs(rng, fleet, 96)
    dispatcher = Dispatcher(fleet, 96)
    cut = dispatcher.solve(inputs, budget_s=0.003, last_plan=None)
    assert cut.rung is FallbackRung.RULE_BASED
    assert cut.reason.startswith("solver timeout after ")
    # Running out of budget is not a solver failure (nothing is rebuilt, progress is kept).
    assert dispatcher.health.solver_failures_total == 0
    plan = dispatcher.solve(inputs, budget_s=60.0, last_plan=None)
    assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT)
    fresh = Dispatcher(fleet, 96).solve(inputs, budget_s=60.0, last_plan=None)
    assert plan.objective == pytest.approx(fresh.objective, rel=1e-6, abs=1e-6)
