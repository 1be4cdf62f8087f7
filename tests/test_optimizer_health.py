"""The optimizer over a long life: thousands of warm re-solves, and a solver that keeps failing."""

from __future__ import annotations

from typing import Any

import highspy
import numpy as np
import pytest

from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs, SolverHealth
from essd.domain import FallbackRung, LiveLimits, Plan
from tests.support.optimizer import T0

HOUR = 3600.0
STEPS = 24
BATTERY = BatterySpec(id="home", capacity_wh=10_000.0, degradation_cost_per_kwh=0.02)


def cycle(rng: np.random.Generator, now: float, last: Plan | None) -> DispatchInputs:
    """One cycle's inputs: a daily shape redrawn each time, SoC inside its window (rung 1)."""
    hours = (now / HOUR + np.arange(STEPS)) % 24
    load = 800.0 * (1 + 0.5 * np.sin(2 * np.pi * (hours - 8) / 24)) * rng.uniform(0.8, 1.2, STEPS)
    pv = np.maximum(0.0, 3000.0 * np.sin(2 * np.pi * (hours - 6) / 24)) * rng.uniform(0.8, 1.2)
    price = 0.25 + 0.1 * np.sin(2 * np.pi * (hours - 18) / 24) + 0.02 * rng.standard_normal(STEPS)
    return DispatchInputs(
        time=now,
        step_s=HOUR,
        soc={"home": float(rng.uniform(0.2, 0.8))},
        limits={"home": LiveLimits(3e3, 3e3)},
        reserve_soc={"home": 0.1},
        max_soc={"home": 0.95},
        load_w=load.tolist(),
        pv_w=pv.tolist(),
        import_price=price.tolist(),
        export_price=(0.5 * price - 0.02).tolist(),
        demand_charge_per_kw=float(rng.choice([0.0, 5.0])),
        peak_import_w=1500.0,
        previous_setpoint_w={"home": last.power_w["home"][0] if last else 0.0},
        terminal_value_per_kwh=0.1,
    )


@pytest.mark.slow
def test_ten_thousand_warm_resolves_all_stay_optimal() -> None:
    """One Dispatcher re-solves >= 10,000 times and every plan is optimal.

    HiGHS compares its time limit with the instance's run clock, which adds up every run
    (ERGO-Code/HiGHS#1331): with the budget as the limit, once the solves so far had used one
    budget's worth of solver time in all, every later solve stopped at once. So the loop goes
    on until the solver time adds up to more than twice the budget, however fast the machine.
    """
    rng = np.random.default_rng(2026)
    budget_s = 1.0
    dispatcher = Dispatcher([BATTERY], STEPS, step_s=HOUR)
    plan: Plan | None = None
    solves = 0
    solver_s = 0.0
    while solves < 10_000 or solver_s < 2 * budget_s:
        inputs = cycle(rng, T0 + 60.0 * solves, plan)
        plan = dispatcher.solve(inputs, budget_s=budget_s, last_plan=plan)
        assert plan.rung is FallbackRung.OPTIMAL, f"solve {solves}: {plan.reason}"
        solves += 1
        solver_s += dispatcher.last_timing.solver_s
        assert solves < 200_000, "the solver's run time never added up to twice the budget"
    assert dispatcher.health == SolverHealth()


def _highs_with_stuck_clock(healthy_from: int) -> tuple[Any, list[Any]]:
    """A stand-in for ``highspy.Highs``: its first instances stop every run at once.

    The instances are real HiGHS models; only their time limit is forced to 0, as if their
    run clock had passed any limit (the failure mode of ERGO-Code/HiGHS#1331). From instance
    number ``healthy_from`` (counting from 1) on they are plain HiGHS.
    """
    real = highspy.Highs
    made: list[Any] = []

    class StuckClock(real):  # type: ignore[misc, valid-type]
        def setOptionValue(self, name: str, value: Any) -> Any:  # noqa: N802 - highspy's name
            return super().setOptionValue(name, 0.0 if name == "time_limit" else value)

    def factory() -> Any:
        instance = StuckClock() if len(made) + 1 < healthy_from else real()
        made.append(instance)
        return instance

    return factory, made


def test_failure_streak_rebuilds_the_solver_and_solves_recover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three solves in a row stopped at once by the time limit: HiGHS is rebuilt cold."""
    factory, made = _highs_with_stuck_clock(healthy_from=2)
    monkeypatch.setattr(highspy, "Highs", factory)
    rng = np.random.default_rng(1)
    dispatcher = Dispatcher([BATTERY], STEPS, step_s=HOUR)
    for k in range(1, 4):
        plan = dispatcher.solve(cycle(rng, T0 + 60.0 * k, None), budget_s=30.0, last_plan=None)
        assert plan.rung is FallbackRung.RULE_BASED
        assert plan.reason.startswith("solver stopped at its time limit after ")
        assert dispatcher.health.solver_failures_consecutive == k
        assert ("solver rebuilt after 3 failed solves in a row" in plan.reason) == (k == 3)
    assert dispatcher.health == SolverHealth(
        solver_failures_consecutive=3, solver_failures_total=3, solver_rebuilds_total=1
    )
    assert len(made) == 1
    recovered = dispatcher.solve(cycle(rng, T0 + 180.0, None), budget_s=30.0, last_plan=None)
    assert recovered.rung is FallbackRung.OPTIMAL, recovered.reason
    assert len(made) == 2  # a fresh HiGHS instance
    assert dispatcher.health == SolverHealth(
        solver_failures_consecutive=0, solver_failures_total=3, solver_rebuilds_total=1
    )


def test_a_lasting_failure_rebuilds_every_few_solves(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the solver keeps failing the streak grows and it is rebuilt every third solve."""
    factory, made = _highs_with_stuck_clock(healthy_from=10**9)
    monkeypatch.setattr(highspy, "Highs", factory)
    rng = np.random.default_rng(2)
    dispatcher = Dispatcher([BATTERY], STEPS, step_s=HOUR, rebuild_after_failures=3)
    last = None
    for k in range(7):
        last = dispatcher.solve(cycle(rng, T0 + 60.0 * k, None), budget_s=30.0, last_plan=last)
        assert last.rung is FallbackRung.RULE_BASED
    assert dispatcher.health == SolverHealth(
        solver_failures_consecutive=7, solver_failures_total=7, solver_rebuilds_total=2
    )
    assert len(made) == 3


def test_failures_through_cvxpy_are_counted_and_rebuild_the_problem() -> None:
    """Without the hot start a failing solver is counted as well; the cvxpy problem is rebuilt."""
    dispatcher = Dispatcher(
        [BATTERY], STEPS, step_s=HOUR, hot_start=False, solver_options={"no_such_option": 1}
    )
    first = dispatcher.problem(HOUR)
    rng = np.random.default_rng(3)
    for k in range(3):
        plan = dispatcher.solve(cycle(rng, T0 + 60.0 * k, None), budget_s=30.0, last_plan=None)
        assert plan.reason.startswith("solver error")
    assert dispatcher.health == SolverHealth(
        solver_failures_consecutive=3, solver_failures_total=3, solver_rebuilds_total=1
    )
    assert dispatcher.problem(HOUR) is not first
    assert dispatcher.problem(HOUR).is_dpp()


def test_budget_overruns_are_not_solver_failures() -> None:
    """A solve cut short by its budget falls back but leaves the health counters alone."""
    rng = np.random.default_rng(4)
    dispatcher = Dispatcher([BATTERY], STEPS, step_s=HOUR)
    for k in range(4):
        plan = dispatcher.solve(cycle(rng, T0 + 60.0 * k, None), budget_s=1e-9, last_plan=None)
        assert plan.reason.startswith("solver timeout after ")
    assert dispatcher.health == SolverHealth()
    plan = dispatcher.solve(cycle(rng, T0 + 300.0, None), budget_s=30.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL


def test_rebuild_threshold_is_validated() -> None:
    """At least one failure must precede a rebuild."""
    with pytest.raises(ValueError, match="rebuild_after_failures"):
        Dispatcher([BATTERY], STEPS, rebuild_after_failures=0)
