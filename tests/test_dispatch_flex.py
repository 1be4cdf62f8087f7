"""EV sessions and swap packs as flexible loads in the dispatch LP (essd.dispatch.flex)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs, InvalidDispatchInputsError
from essd.dispatch.flex import FlexSpec
from essd.dispatch.sessions import MIN_STAY_S, FlexSession
from essd.domain import FallbackRung, LiveLimits
from essd.flexloads import charge_limits_w

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
STEP_S = 900.0
STEPS = 96
HOURS = ((T0 + STEP_S * np.arange(STEPS)) % 86400.0) / 3600.0


def _inputs(
    sessions: list[FlexSession],
    *,
    price: np.ndarray | None = None,
    pv: np.ndarray | None = None,
    export_ratio: float = 0.3,
    import_limit_w: float = math.inf,
    load_w: float = 500.0,
) -> DispatchInputs:
    if price is None:
        price = np.where((HOURS >= 1) & (HOURS < 5), 0.10, 0.30)
    pv = np.zeros(STEPS) if pv is None else pv
    return DispatchInputs(
        time=T0,
        step_s=STEP_S,
        soc={"bat": 0.5},
        limits={"bat": LiveLimits(5000.0, 5000.0)},
        reserve_soc={"bat": 0.1},
        max_soc={"bat": 0.9},
        load_w=[load_w] * STEPS,
        pv_w=pv.tolist(),
        import_price=price.tolist(),
        export_price=(price * export_ratio).tolist(),
        import_limit_w=import_limit_w,
        sessions=sessions,
    )


def _ev(
    sid: str, *, arrive_h: float = 0.0, leave_h: float, need_wh: float, **kw: float
) -> FlexSession:
    return FlexSession(
        id=sid,
        charger_id=f"cp-{sid}",
        arrival_s=T0 + arrive_h * 3600.0,
        departure_s=T0 + leave_h * 3600.0,
        energy_needed_wh=need_wh,
        max_power_w=kw.pop("max_power_w", 11000.0),
        **kw,
    )


def _delivered_battery_wh(power_w: tuple[float, ...], eta: float = 0.92) -> float:
    """Battery energy a plan's session power delivers (charging only)."""
    p = np.asarray(power_w)
    return float(np.maximum(-p, 0.0).sum() * STEP_S / 3600.0 * eta)


@pytest.fixture(scope="module")
def dispatcher() -> Dispatcher:
    return Dispatcher([BatterySpec("bat", 10_000.0)], STEPS, step_s=STEP_S, flex=FlexSpec(10))


def test_problem_with_sessions_is_dpp(dispatcher: Dispatcher) -> None:
    assert dispatcher.problem(STEP_S).is_dpp()


def test_requirement_met_in_the_cheap_hours_within_presence(dispatcher: Dispatcher) -> None:
    plan = dispatcher.solve(
        _inputs([_ev("a", leave_h=7.0, need_wh=20_000.0)]), budget_s=10.0, last_plan=None
    )
    assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    power = np.asarray(plan.session_power_w["a"])
    assert _delivered_battery_wh(plan.session_power_w["a"]) >= 20_000.0 - 1.0
    assert (power <= 1e-6).all(), "no V2G was allowed"
    assert np.allclose(power[HOURS >= 7.0], 0.0), "nothing after the departure"
    cheap = (HOURS >= 1) & (HOURS < 5)
    # 21.7 kWh AC fits into the 4 cheap hours at 11 kW: all of it is bought there.
    assert -power[cheap].sum() == pytest.approx(-power.sum(), rel=1e-6)
    # The predicted grid includes the vehicle: load - PV - battery + vehicle, step by step.
    inputs = _inputs([_ev("a", leave_h=7.0, need_wh=20_000.0)])
    balance = (
        np.asarray(inputs.load_w)
        - np.asarray(inputs.pv_w)
        - np.asarray(plan.power_w["bat"])
        - power  # session power < 0 draws from the site
    )
    assert np.allclose(plan.grid_w, balance, atol=1.0)
    assert max(plan.grid_w) >= 500.0 + 11_000.0 - 1.0


def test_site_import_limit_shared_with_battery_and_chargers(dispatcher: Dispatcher) -> None:
    sessions = [_ev(f"v{i}", leave_h=9.0, need_wh=15_000.0) for i in range(10)]
    plan = dispatcher.solve(
        _inputs(sessions, import_limit_w=60_000.0), budget_s=10.0, last_plan=None
    )
    assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    assert max(plan.grid_w) <= 60_000.0 + 1e-3
    for s in sessions:
        assert _delivered_battery_wh(plan.session_power_w[s.id]) >= 15_000.0 - 1.0


def test_deadline_that_cannot_be_met_publishes_its_shortfall_and_keeps_the_limit(
    dispatcher: Dispatcher,
) -> None:
    # Two vehicles needing 20 kWh each within one hour under a 12 kW connection.
    sessions = [_ev(f"v{i}", leave_h=1.0, need_wh=20_000.0) for i in range(2)]
    plan = dispatcher.solve(
        _inputs(sessions, import_limit_w=12_000.0), budget_s=10.0, last_plan=None
    )
    assert plan.rung is FallbackRung.SOFT
    assert "import_limit_w" not in plan.slack
    assert max(plan.grid_w) <= 12_000.0 + 1e-3
    short = sum(plan.slack[f"session_shortfall_wh[v{i}]"] for i in range(2))
    delivered = sum(_delivered_battery_wh(plan.session_power_w[f"v{i}"]) for i in range(2))
    # The battery helps (5 kW for the hour); what is still missing is published exactly.
    assert delivered + short == pytest.approx(40_000.0, rel=1e-4)
    assert delivered > (12_000.0 - 500.0) * 0.92  # battery discharge added to the grid's share


def test_pv_surplus_preferred_to_cheap_night_import() -> None:
    d = Dispatcher([BatterySpec("bat", 1_000.0)], STEPS, step_s=STEP_S, flex=FlexSpec(1))
    pv = np.maximum(0.0, 8000.0 * np.sin(np.pi * (HOURS - 7.0) / 10.0))
    price = np.full(STEPS, 0.25)
    # Export pays 0.05: energy from PV surplus is worth 0.05, import 0.25.
    plan = d.solve(
        _inputs([_ev("a", leave_h=23.0, need_wh=10_000.0)], price=price, pv=pv, export_ratio=0.2),
        budget_s=10.0,
        last_plan=None,
    )
    power = -np.asarray(plan.session_power_w["a"])
    surplus = np.maximum(pv - 500.0, 0.0)
    assert (power <= surplus + 1e-3).all(), "charges only from the PV surplus"
    assert _delivered_battery_wh(plan.session_power_w["a"]) >= 10_000.0 - 1.0


def test_v2g_only_where_allowed_and_requirement_still_met() -> None:
    d = Dispatcher([BatterySpec("bat", 1_000.0)], STEPS, step_s=STEP_S, flex=FlexSpec(1, v2g=True))
    assert d.problem(STEP_S).is_dpp()
    price = np.full(STEPS, 0.10)
    price[(HOURS >= 18) & (HOURS < 19)] = 2.0  # an evening spike worth exporting into
    ev = _ev("a", leave_h=23.5, need_wh=5_000.0, max_discharge_w=7000.0, v2g_energy_wh=10_000.0)
    plan = d.solve(_inputs([ev], price=price, export_ratio=0.9), budget_s=10.0, last_plan=None)
    power = np.asarray(plan.session_power_w["a"])
    spike = (HOURS >= 18) & (HOURS < 19)
    assert power[spike].min() > 6_000.0, "discharges into the spike"
    net_ac_kwh = -power.sum() * STEP_S / 3600.0 / 1000.0
    assert net_ac_kwh > 0
    assert not plan.slack, plan.slack
    plan = d.solve(
        _inputs([replace(ev, max_discharge_w=0.0)], price=price, export_ratio=0.9),
        budget_s=10.0,
        last_plan=None,
    )
    assert max(plan.session_power_w["a"]) <= 1e-6


def test_departure_beyond_horizon_asks_only_what_cannot_come_later(dispatcher: Dispatcher) -> None:
    # Leaves 2 h after the horizon with 40 kWh to go: 2 h x 11 kW can come after it.
    ev = _ev("a", leave_h=26.0, need_wh=40_000.0)
    plan = dispatcher.solve(_inputs([ev]), budget_s=10.0, last_plan=None)
    assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    ac_kwh = -sum(plan.session_power_w["a"]) * STEP_S / 3600.0 / 1000.0
    assert ac_kwh == pytest.approx(40.0 / 0.92 - 22.0, abs=0.01)


def test_future_arrival_and_overstay(dispatcher: Dispatcher) -> None:
    later = _ev("later", arrive_h=18.0, leave_h=22.0, need_wh=5_000.0)
    overstay = replace(
        _ev("late", leave_h=1.0, need_wh=1_000.0), departure_s=T0 - 600.0, arrival_s=T0 - 7200.0
    )
    plan = dispatcher.solve(_inputs([later, overstay]), budget_s=10.0, last_plan=None)
    p_later = np.asarray(plan.session_power_w["later"])
    assert np.allclose(p_later[(HOURS < 18) | (HOURS >= 22)], 0.0)
    assert _delivered_battery_wh(plan.session_power_w["later"]) >= 5_000.0 - 1.0
    p_late = np.asarray(plan.session_power_w["late"])
    assert np.allclose(p_late[1:], 0.0), "an overstaying vehicle may leave any moment"
    # Planned as staying one more minute: the step's average is that minute at full power,
    # and what it cannot get in it is published.
    assert p_late[0] == pytest.approx(-11_000.0 * MIN_STAY_S / STEP_S, rel=1e-6)
    got = _delivered_battery_wh(plan.session_power_w["late"])
    assert plan.slack["session_shortfall_wh[late]"] == pytest.approx(1_000.0 - got, rel=1e-4)
    # Turned back into a charger limit: full power for as long as it stays.
    limits = charge_limits_w(plan, [later, overstay])
    assert limits == {"cp-late": pytest.approx(11_000.0), "cp-later": 0.0}


def test_vehicle_leaving_within_the_first_step_gets_its_energy_while_there(
    dispatcher: Dispatcher,
) -> None:
    # 5 minutes left of a 15-minute step, 500 Wh to go: the plan's step average is a third of
    # the power the charger must give in those 5 minutes.
    ev = _ev("a", leave_h=5.0 / 60.0, need_wh=500.0)
    plan = dispatcher.solve(_inputs([ev]), budget_s=10.0, last_plan=None)
    assert not plan.slack, plan.slack
    limit = charge_limits_w(plan, [ev])["cp-a"]
    assert limit * (5.0 / 60.0) * 0.92 == pytest.approx(500.0, rel=1e-3)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"energy_needed_wh": -1.0}, "sessions[a].energy_needed_wh"),
        ({"max_power_w": 0.0}, "sessions[a].max_power_w"),
        ({"departure_s": T0 - 1.0}, "sessions[a].departure_s"),
        ({"arrival_s": math.nan}, "sessions[a].arrival_s"),
        ({"min_power_w": 20_000.0}, "sessions[a].min_power_w"),
        ({"charge_efficiency": 1.5}, "sessions[a].charge_efficiency"),
        ({"energy_room_wh": -5.0}, "sessions[a].energy_room_wh"),
    ],
)
def test_invalid_session_names_its_field(
    dispatcher: Dispatcher, change: dict[str, float], field: str
) -> None:
    ev = replace(_ev("a", leave_h=5.0, need_wh=1_000.0), **change)
    with pytest.raises(InvalidDispatchInputsError) as err:
        dispatcher.solve(_inputs([ev]), budget_s=5.0, last_plan=None)
    assert err.value.field == field


def test_more_sessions_than_columns_and_duplicates_rejected(dispatcher: Dispatcher) -> None:
    many = [_ev(f"v{i}", leave_h=5.0, need_wh=1.0) for i in range(11)]
    with pytest.raises(InvalidDispatchInputsError, match="11 sessions"):
        dispatcher.validate(_inputs(many))
    twice = [_ev("v", leave_h=5.0, need_wh=1.0)] * 2
    with pytest.raises(InvalidDispatchInputsError, match="duplicate"):
        dispatcher.validate(_inputs(twice))


def test_chargers_only_site_uses_the_whole_connection() -> None:
    # No battery at all; 10 vehicles needing 50 kWh each within 8 h under 60 kW: the import
    # limit (not some internal bound) is what binds.
    d = Dispatcher([], STEPS, step_s=STEP_S, flex=FlexSpec(10))
    sessions = [_ev(f"v{i}", leave_h=8.0, need_wh=50_000.0) for i in range(10)]
    inputs = replace(
        _inputs(sessions, import_limit_w=60_000.0),
        soc={},
        limits={},
        reserve_soc={},
        max_soc={},
    )
    plan = d.solve(inputs, budget_s=10.0, last_plan=None)
    assert plan.rung is FallbackRung.SOFT  # 543 kWh AC do not fit into 8 h x 59.5 kW
    assert max(plan.grid_w) == pytest.approx(60_000.0, abs=1.0)
    delivered = sum(_delivered_battery_wh(plan.session_power_w[s.id]) for s in sessions)
    short = sum(
        plan.slack[f"session_shortfall_wh[{s.id}]"]
        for s in sessions
        if f"session_shortfall_wh[{s.id}]" in plan.slack
    )
    assert delivered == pytest.approx(8 * 59.5 * 1000.0 * 0.92, rel=1e-4)
    assert delivered + short == pytest.approx(500_000.0, rel=1e-4)


def test_charge_only_optimizer_refuses_v2g_sessions(dispatcher: Dispatcher) -> None:
    ev = _ev("a", leave_h=5.0, need_wh=1_000.0, max_discharge_w=5000.0)
    with pytest.raises(InvalidDispatchInputsError) as err:
        dispatcher.validate(_inputs([ev]))
    assert err.value.field == "sessions[a].max_discharge_w"


def test_charge_only_and_v2g_models_agree_without_v2g() -> None:
    sessions = [_ev(f"v{i}", leave_h=6.0 + i, need_wh=12_000.0) for i in range(4)]
    plans = []
    for v2g in (False, True):
        d = Dispatcher(
            [BatterySpec("bat", 10_000.0)], STEPS, step_s=STEP_S, flex=FlexSpec(4, v2g=v2g)
        )
        plans.append(
            d.solve(_inputs(sessions, import_limit_w=20_000.0), budget_s=10.0, last_plan=None)
        )
    assert plans[0].objective == pytest.approx(plans[1].objective, rel=1e-6, abs=1e-6)
