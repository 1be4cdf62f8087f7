"""The dispatch optimizer: formulation, reference agreement, hand-known optima, honesty."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest

from essd.dispatch import (
    BatterySpec,
    Dispatcher,
    DispatchInputs,
    InvalidDispatchInputsError,
    dispatcher,
    terminal_value,
    validate_inputs,
)
from essd.domain import FallbackRung, LiveLimits
from tests.support.optimizer import (
    T0,
    agrees_with_reference,
    random_fleet,
    random_inputs,
    reference_solve,
    simulate_soc,
)

HOUR = 3600.0


def one_battery(**kw: object) -> BatterySpec:
    base: dict[str, object] = {
        "id": "bat",
        "capacity_wh": 20_000.0,
        "charge_efficiency": 1.0,
        "discharge_efficiency": 1.0,
    }
    base.update(kw)
    return BatterySpec(**base)  # type: ignore[arg-type]


def hourly_inputs(bat: BatterySpec, **kw: object) -> DispatchInputs:
    steps = len(kw["load_w"])  # type: ignore[arg-type]
    base: dict[str, object] = {
        "time": T0,
        "step_s": HOUR,
        "soc": {bat.id: 0.5},
        "limits": {bat.id: LiveLimits(50_000.0, 50_000.0)},
        "reserve_soc": {bat.id: 0.0},
        "max_soc": {bat.id: 1.0},
        "pv_w": [0.0] * steps,
        "import_price": [0.0] * steps,
        "export_price": [0.0] * steps,
    }
    base.update(kw)
    return DispatchInputs(**base)  # type: ignore[arg-type]


def test_problem_is_dpp() -> None:
    """Compiled once: every per-cycle number is a parameter in a DPP expression."""
    dispatcher = Dispatcher(random_fleet(np.random.default_rng(0), 3), 24)
    assert dispatcher.problem().is_dpp()
    assert dispatcher.problem().is_dcp()


def test_matches_independent_reference() -> None:
    """Objective within 1e-4 relative of a hand-built scipy/HiGHS LP on 70 random instances
    (the last ten with more units than get a per-unit change cost at every step)."""
    rng = np.random.default_rng(2026)
    compared = 0
    for steps, nb in ((6, 1), (24, 1), (96, 1), (12, 2), (24, 3), (48, 4), (24, 10)):
        fleet = random_fleet(rng, nb)
        dispatcher = Dispatcher(fleet, steps)
        for _ in range(10):
            inputs = random_inputs(rng, fleet, steps)
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            compared += agrees_with_reference(plan, reference_solve(fleet, inputs))
    assert compared >= 58


def test_matches_reference_on_hot_start_sequence() -> None:
    """Hot-started re-solves of one Dispatcher agree with the reference as cold solves do."""
    rng = np.random.default_rng(7)
    fleet = random_fleet(rng, 2)
    dispatcher = Dispatcher(fleet, 12, step_s=1800.0)
    base = random_inputs(rng, fleet, 12, step_s=1800.0)
    for k in range(6):
        # Next cycles: the SoC moves, the forecast wobbles, as between real cycles.
        inputs = dataclasses.replace(
            base,
            time=T0 + 60.0 * k,
            soc={i: min(1.0, max(0.0, s + 0.01 * k)) for i, s in base.soc.items()},
            load_w=(np.asarray(base.load_w) * rng.uniform(0.95, 1.05, 12)).tolist(),
        )
        plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
        ref = reference_solve(fleet, inputs)
        if "re-solve" not in plan.reason:
            assert plan.objective == pytest.approx(ref.objective, rel=1e-4, abs=1e-6)


def test_solvers_agree() -> None:
    """The hot-started HiGHS path, cvxpy's own HiGHS call and Clarabel find the same optimum."""
    rng = np.random.default_rng(3)
    fleet = random_fleet(rng, 2)
    inputs = random_inputs(rng, fleet, 16)
    values = [
        Dispatcher(fleet, 16, **kw).solve(inputs, budget_s=10.0, last_plan=None).objective  # type: ignore[arg-type]
        for kw in ({}, {"hot_start": False}, {"solver": "CLARABEL"})
    ]
    assert values[1] == pytest.approx(values[0], rel=1e-5, abs=1e-6)
    assert values[2] == pytest.approx(values[0], rel=1e-4, abs=1e-5)


def test_demand_charge_flattens_peak_by_hand() -> None:
    """Loads 10/10/30/10 kW, energy free, 10 kWh stored and 10 kWh of room, 1 per kW of peak.

    By hand: hold every step's import at a level L. The peak step needs 30 - L from the
    battery, which holds 10 kWh plus what it charges in the two earlier steps, 2 (L - 10):
    30 - L <= 10 + 2 (L - 10) gives L = 40/3 kW, so the optimum costs 40/3.
    """
    bat = one_battery()
    dispatcher = Dispatcher([bat], 4, step_s=HOUR, change_cost_per_kw=0.0, hold_value_per_kwh=0.0)
    inputs = hourly_inputs(bat, load_w=[10e3, 10e3, 30e3, 10e3], demand_charge_per_kw=1.0)
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert plan.objective == pytest.approx(40 / 3, abs=1e-6)
    assert max(plan.grid_w) == pytest.approx(40e3 / 3, abs=1e-3)
    assert plan.power_w["bat"][2] == pytest.approx(30e3 - 40e3 / 3, abs=1e-3)
    assert plan.power_w["bat"][:2] == pytest.approx((-10e3 / 3, -10e3 / 3), abs=1e-3)


def test_demand_charge_counts_only_above_running_peak() -> None:
    """Running peak 25 kW, empty battery: charge off-peak, shave 5 kW at the peak, cost 0."""
    bat = one_battery()
    dispatcher = Dispatcher([bat], 4, step_s=HOUR, change_cost_per_kw=0.0, hold_value_per_kwh=0.0)
    inputs = hourly_inputs(
        bat,
        load_w=[10e3, 10e3, 30e3, 10e3],
        demand_charge_per_kw=1.0,
        peak_import_w=25e3,
        soc={"bat": 0.0},
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.objective == pytest.approx(0.0, abs=1e-6)
    assert max(plan.grid_w) <= 25e3 + 1e-3
    assert plan.power_w["bat"][2] >= 5e3 - 1e-3
    # Without the battery's help the new 30 kW peak would cost 5 kW x 1/kW.
    idle = dataclasses.replace(inputs, limits={"bat": LiveLimits(0.0, 0.0)})
    assert dispatcher.solve(idle, budget_s=5.0, last_plan=None).objective == pytest.approx(5.0)


def test_export_limit_by_hand() -> None:
    """5 kW PV surplus for 2 h, 2 kW export limit: 4 kWh sold at 0.1, 6 kWh kept at 0.05."""
    bat = one_battery(capacity_wh=10_000.0)
    dispatcher = Dispatcher([bat], 2, step_s=HOUR, change_cost_per_kw=0.0, hold_value_per_kwh=0.0)
    inputs = hourly_inputs(
        bat,
        soc={"bat": 0.0},
        load_w=[0.0, 0.0],
        pv_w=[5e3, 5e3],
        import_price=[0.3, 0.3],
        export_price=[0.1, 0.1],
        export_limit_w=2e3,
        terminal_value_per_kwh=0.05,
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert plan.objective == pytest.approx(-(0.4 + 0.3), abs=1e-6)
    assert plan.grid_w == pytest.approx((-2e3, -2e3), abs=1e-3)
    assert plan.power_w["bat"] == pytest.approx((-3e3, -3e3), abs=1e-3)
    assert plan.soc["bat"][-1] == pytest.approx(0.6, abs=1e-6)


def test_zero_export_by_hand() -> None:
    """Export limit 0: all 10 kWh of surplus go into the battery, nothing leaves the site."""
    bat = one_battery(capacity_wh=10_000.0)
    dispatcher = Dispatcher([bat], 2, step_s=HOUR, change_cost_per_kw=0.0, hold_value_per_kwh=0.0)
    inputs = hourly_inputs(
        bat,
        soc={"bat": 0.0},
        load_w=[0.0, 0.0],
        pv_w=[5e3, 5e3],
        export_price=[0.1, 0.1],
        export_limit_w=0.0,
        terminal_value_per_kwh=0.05,
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert plan.objective == pytest.approx(-0.5, abs=1e-6)
    assert plan.grid_w == pytest.approx((0.0, 0.0), abs=1e-3)
    assert plan.soc["bat"][-1] == pytest.approx(1.0, abs=1e-6)


def test_negative_net_load_charges_from_surplus_by_hand() -> None:
    """A negative net load (PV export, forecast with pv 0) is stored and later used: no import.

    Net load -3 kW for two hours, then +3 kW for two.
    """
    bat = one_battery(capacity_wh=10_000.0)
    dispatcher = Dispatcher([bat], 4, step_s=HOUR, change_cost_per_kw=0.0, hold_value_per_kwh=0.0)
    inputs = hourly_inputs(
        bat,
        soc={"bat": 0.0},
        load_w=[-3e3, -3e3, 3e3, 3e3],
        import_price=[0.3] * 4,
        export_price=[0.05] * 4,
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    assert plan.power_w["bat"] == pytest.approx((-3e3, -3e3, 3e3, 3e3), abs=1e-3)
    assert plan.grid_w == pytest.approx((0.0,) * 4, abs=1e-3)
    assert plan.objective == pytest.approx(0.0, abs=1e-6)
    # The same site described with PV apart gives the same plan.
    split = dataclasses.replace(inputs, load_w=[0.0, 0.0, 3e3, 3e3], pv_w=[3e3, 3e3, 0.0, 0.0])
    assert dispatcher.solve(split, budget_s=5.0, last_plan=None).power_w == plan.power_w


def test_negative_net_load_matches_reference() -> None:
    """Random sites given as net load (often < 0) and pv 0 agree with the reference LP.

    And with the same site whose PV is given apart: only load - pv enters the LP.
    """
    rng = np.random.default_rng(31)
    compared = 0
    negative_steps = 0
    for steps, nb in ((24, 1), (24, 2), (48, 3)):
        fleet = random_fleet(rng, nb)
        dispatcher = Dispatcher(fleet, steps)
        for _ in range(8):
            split = random_inputs(rng, fleet, steps)
            net = np.asarray(split.load_w) - np.asarray(split.pv_w)
            negative_steps += int((net < 0).sum())
            inputs = dataclasses.replace(split, load_w=net.tolist(), pv_w=[0.0] * steps)
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
            assert plan.grid_w == pytest.approx(
                tuple(net - np.sum([plan.power_w[b.id] for b in fleet], axis=0)), abs=1e-3
            )
            same = dispatcher.solve(split, budget_s=10.0, last_plan=None)
            assert plan.objective == pytest.approx(same.objective, rel=1e-6, abs=1e-6)
            if "re-solve" in plan.reason:
                continue
            ref = reference_solve(fleet, inputs)
            assert plan.objective == pytest.approx(ref.objective, rel=1e-4, abs=1e-6)
            compared += 1
    assert compared >= 18
    assert negative_steps > 40


def test_below_reserve_recovers_from_negative_net_load_without_import() -> None:
    """Below reserve, no import allowed: the SoC recovers on the surplus of a negative net load.

    The recovery path into the SoC window may use only the import headroom, which a negative
    net load widens; the site still imports nothing.
    """
    bat = one_battery(capacity_wh=10_000.0)
    dispatcher = Dispatcher([bat], 4, step_s=HOUR)
    inputs = hourly_inputs(
        bat,
        soc={"bat": 0.05},
        reserve_soc={"bat": 0.3},
        limits={"bat": LiveLimits(5e3, 5e3)},
        load_w=[-1e3, -1e3, -1e3, -1e3],
        import_limit_w=0.0,
        import_price=[0.3] * 4,
        export_price=[0.1] * 4,
    )
    plan = dispatcher.solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.SOFT, plan.reason
    assert plan.slack == {"reserve_soc[bat]": pytest.approx(0.25)}
    assert max(plan.grid_w) <= 1e-3
    # 1 kW of surplus an hour: 0.1 SoC an hour, reserve reached after 2.5 h, never dipped under.
    assert plan.soc["bat"][1:3] == pytest.approx((0.15, 0.25), abs=1e-6)
    assert plan.soc["bat"][3] >= 0.3 - 1e-6
    ref = reference_solve([bat], inputs)
    assert plan.objective == pytest.approx(ref.objective, rel=1e-4, abs=1e-6)


def negative_price_instance(rng: np.random.Generator) -> tuple[list[BatterySpec], DispatchInputs]:
    """Nearly full batteries, no degradation cost, paid to import for hours."""
    steps = 24
    fleet = [
        BatterySpec(
            id=f"bat{i}",
            capacity_wh=float(rng.uniform(5e3, 15e3)),
            charge_efficiency=float(rng.uniform(0.85, 0.97)),
            discharge_efficiency=float(rng.uniform(0.85, 0.97)),
        )
        for i in range(2)
    ]
    price = -0.2 + 0.05 * rng.standard_normal(steps)
    inputs = DispatchInputs(
        time=T0,
        step_s=900.0,
        soc={b.id: float(rng.uniform(0.8, 0.95)) for b in fleet},
        limits={b.id: LiveLimits(b.capacity_wh * 0.5, b.capacity_wh * 0.5) for b in fleet},
        reserve_soc={b.id: 0.1 for b in fleet},
        max_soc={b.id: 1.0 for b in fleet},
        load_w=rng.uniform(500, 2000, steps).tolist(),
        pv_w=[0.0] * steps,
        import_price=price.tolist(),
        export_price=(price - 0.05).tolist(),
    )
    return fleet, inputs


def test_negative_prices_never_charge_and_discharge_at_once() -> None:
    """Negative prices, no degradation cost: the raw LP burns energy by doing both at once;
    the published plan has one direction per step and a SoC that its own setpoints produce."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        fleet, inputs = negative_price_instance(rng)
        dispatcher = Dispatcher(fleet, 24)
        # What the plain LP does: both directions in one step, for some battery and step.
        a = validate_inputs(fleet, 24, inputs)
        model = dispatcher._model(inputs.step_s)
        model.assign(a, a.ub_c, a.ub_d)
        model.problem.solve(solver="HIGHS")
        assert (np.minimum(model.c.value, model.d.value) > 1e-3).any()

        plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
        assert plan.rung is FallbackRung.OPTIMAL
        assert "re-solve" in plan.reason
        # Physically feasible, so never better than the MILP (one direction per step) optimum;
        # the documented shortfall of the direction fix is at most 25 %.
        best = reference_solve(fleet, inputs, one_direction=True).objective
        assert best - 1e-6 <= plan.objective <= best + 0.25 * abs(best)
        for spec in fleet:
            honest = simulate_soc(spec, inputs.soc[spec.id], plan.power_w[spec.id], inputs.step_s)
            assert plan.soc[spec.id] == pytest.approx(honest, abs=1e-6)
            assert max(plan.soc[spec.id]) <= 1.0 + 1e-9
            lim = inputs.limits[spec.id]
            assert all(
                -lim.max_charge_w - 1e-3 <= p <= lim.max_discharge_w + 1e-3
                for p in plan.power_w[spec.id]
            )


def test_portable_unit_only_charges_and_respects_availability() -> None:
    """A unit without a discharge setpoint is never planned to discharge, nor used while away."""
    portable = BatterySpec(id="portable", capacity_wh=1000.0, can_discharge=False)
    home = BatterySpec(id="home", capacity_wh=10_000.0)
    steps = 8
    away = [True, True, False, False, False, True, True, True]
    inputs = DispatchInputs(
        time=T0,
        step_s=HOUR,
        soc={"portable": 0.5, "home": 0.5},
        limits={"portable": LiveLimits(300.0, 0.0), "home": LiveLimits(3e3, 3e3)},
        reserve_soc={"portable": 0.0, "home": 0.1},
        max_soc={"portable": 1.0, "home": 0.9},
        load_w=[500.0] * steps,
        pv_w=[2000.0] * 4 + [0.0] * 4,
        import_price=[0.3] * steps,
        export_price=[0.05] * steps,
        availability={"portable": away},
        terminal_value_per_kwh=0.2,
    )
    plan = Dispatcher([portable, home], steps).solve(inputs, budget_s=5.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL
    assert all(p <= 1e-6 for p in plan.power_w["portable"])
    assert all(
        abs(p) < 1e-6 for p, here in zip(plan.power_w["portable"], away, strict=True) if not here
    )
    assert min(plan.power_w["portable"]) < -1.0  # it does charge from the PV surplus


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"load_w": [1.0, math.nan, 1.0, 1.0]}, "load_w[1]"),
        ({"load_w": [1.0, 1.0]}, "load_w"),
        ({"pv_w": [1.0, -5.0, 1.0, 1.0]}, "pv_w[1]"),
        ({"import_price": [0.1, 0.1, math.inf, 0.1]}, "import_price[2]"),
        ({"soc": {"bat": 1.5}}, "soc[bat]"),
        ({"soc": {}}, "soc[bat]"),
        ({"soc": {"bat": 0.5, "ghost": 0.5}}, "soc[ghost]"),
        ({"reserve_soc": {"bat": 0.9}, "max_soc": {"bat": 0.8}}, "reserve_soc[bat]"),
        ({"availability": {"bat": [True]}}, "availability[bat]"),
        ({"availability": {"bat": [True, 1, True, True]}}, "availability[bat]"),
        ({"availability": {"bat": [True, "yes", True, True]}}, "availability[bat]"),
        ({"availability": {"bat": [[True]] * 4}}, "availability[bat]"),
        ({"step_s": 0.0}, "step_s"),
        ({"time": math.nan}, "time"),
        ({"import_limit_w": -1.0}, "import_limit_w"),
        ({"export_limit_w": math.nan}, "export_limit_w"),
        ({"demand_charge_per_kw": -2.0}, "demand_charge_per_kw"),
        ({"carbon_intensity": [0.1] * 3}, "carbon_intensity"),
        ({"previous_setpoint_w": {"bat": math.nan}}, "previous_setpoint_w[bat]"),
        ({"terminal_soc": {"bat": 2.0}}, "terminal_soc[bat]"),
    ],
)
def test_invalid_inputs_name_the_field(change: dict[str, object], field: str) -> None:
    """Bad inputs are refused before solving, with the field in the message."""
    bat = one_battery()
    good = hourly_inputs(bat, load_w=[1e3] * 4)
    bad = dataclasses.replace(good, **change)  # type: ignore[arg-type]
    dispatcher = Dispatcher([bat], 4, step_s=HOUR)
    with pytest.raises(InvalidDispatchInputsError) as err:
        dispatcher.solve(bad, budget_s=5.0, last_plan=None)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


def test_invalid_battery_spec_names_the_field() -> None:
    """Topology errors name the battery and the field too."""
    with pytest.raises(ValueError, match=r"batteries\[b1\]\.charge_efficiency"):
        BatterySpec(id="b1", capacity_wh=1000.0, charge_efficiency=1.2)
    with pytest.raises(ValueError, match=r"batteries\[b1\]\.capacity_wh"):
        BatterySpec(id="b1", capacity_wh=0.0)
    with pytest.raises(ValueError, match="unique"):
        Dispatcher([one_battery(), one_battery()], 4)


def test_solving_in_a_worker_thread_does_not_hold_the_gil() -> None:
    """The daemon solves in a worker thread: its event loop must keep running meanwhile."""
    rng = np.random.default_rng(8)
    fleet = random_fleet(rng, 30)
    inputs = random_inputs(rng, fleet, 288, step_s=300.0)
    dispatcher = Dispatcher(fleet, 288, step_s=300.0)
    done = threading.Event()
    took: list[float] = []

    def work() -> None:
        started = time.perf_counter()
        dispatcher.solve(inputs, budget_s=60.0, last_plan=None)
        took.append(time.perf_counter() - started)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    gaps = []
    last = time.perf_counter()
    while not done.wait(0.001):
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    # A solve holding the GIL would stall this loop for the whole solve.
    assert took[0] > 0.2  # a solve long enough to tell
    # Held for the whole solve, this thread would have run once or twice; it ran throughout
    # (a count of turns, not a timing: a loaded host gives fewer turns, never one).
    assert len(gaps) >= 20


@pytest.mark.parametrize("budget", [0.0, -1.0, math.nan, math.inf])
def test_invalid_budget_is_refused(budget: float) -> None:
    """The time budget must be a positive finite number of seconds."""
    bat = one_battery()
    dispatcher = Dispatcher([bat], 4, step_s=HOUR)
    with pytest.raises(InvalidDispatchInputsError, match=r"^budget_s: "):
        dispatcher.solve(hourly_inputs(bat, load_w=[1e3] * 4), budget_s=budget, last_plan=None)


def test_remaining_overlap_is_applied_as_honest_net_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net behind the direction fix: with no re-solves allowed, the overlap left
    in the LP is published as net power, clipped to limits and window, with an honest SoC."""
    monkeypatch.setattr(dispatcher, "_MAX_DIRECTION_FIXES", 0)
    fleet, inputs = negative_price_instance(np.random.default_rng(11))
    plan = Dispatcher(fleet, 24).solve(inputs, budget_s=10.0, last_plan=None)
    assert "remaining overlap applied as net power" in plan.reason
    for spec in fleet:
        honest = simulate_soc(spec, inputs.soc[spec.id], plan.power_w[spec.id], inputs.step_s)
        assert plan.soc[spec.id] == pytest.approx(honest, abs=1e-9)
        assert max(plan.soc[spec.id]) <= inputs.max_soc[spec.id] + 1e-9
        lim = inputs.limits[spec.id]
        assert all(-lim.max_charge_w <= p <= lim.max_discharge_w for p in plan.power_w[spec.id])


def test_terminal_value_is_the_cheapest_way_to_store_energy_again() -> None:
    """Stored energy is worth the middle between the export price forgone and the cheapest
    import price when the horizon has more PV surplus than the batteries can take, else the
    cheapest import price."""
    imp = np.array([0.3, 0.4, 0.3, 0.2])
    exp = np.array([0.08, 0.08, 0.05, 0.08])
    sunny = np.array([500.0, -6000.0, -6000.0, 500.0])  # 3 kWh over at 15-min steps
    assert terminal_value(imp, exp, sunny, 900.0, room_kwh=2.5) == pytest.approx(0.14)
    assert terminal_value(imp, exp, sunny, 900.0, room_kwh=8.5) == 0.2
    night = np.full(4, 500.0)
    assert terminal_value(imp, exp, night, 900.0, room_kwh=0.0) == 0.2
