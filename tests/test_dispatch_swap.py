"""Battery-swap station as deadlines (essd.dispatch.swap): the queue of packs, docked packs,
the swap-demand learner, and the LP keeping the service level in its own plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from essd.dispatch import Dispatcher, DispatchInputs
from essd.dispatch.flex import FlexSpec
from essd.dispatch.swap import PackState, SwapDemandLearner, SwapStationSpec, swap_sessions

T0 = 1_767_225_600.0
STEP = 900.0


def _packs(socs: list[float]) -> list[PackState]:
    return [PackState(f"s{i}", soc, 50_000.0, 30_000.0) for i, soc in enumerate(socs)]


def test_deadlines_follow_the_queue_and_the_service_level() -> None:
    spec = SwapStationSpec(service_level=2, target_soc=0.9, demand_z=0.0, charge_margin_soc=0.0)
    packs = _packs([0.9, 0.2, 0.9, 0.5, 0.3])
    demand = [1.0] * 8  # one swap per 15-minute step
    sessions = swap_sessions(spec, packs, demand, now=T0, step_s=STEP, columns=8)
    by_id = {s.id: s for s in sessions}
    # Best first: s0, s2 (charged), s3 (0.5), s4 (0.3), s1 (0.2).
    # Place j is due when swap j - k + 1 happens: j = 0, 1 now; j = 2 at swap 1 (step 0);
    # j = 3 at swap 2 (step 1); j = 4 at swap 3 (step 2).
    assert by_id["pack:s0"].energy_needed_wh == 0.0
    assert by_id["pack:s3"].departure_s == T0 + 1.0  # due within the first step
    assert by_id["pack:s4"].departure_s == T0 + STEP
    assert by_id["pack:s1"].departure_s == T0 + 2 * STEP
    assert by_id["pack:s3"].energy_needed_wh == pytest.approx(0.4 * 50_000.0)
    # Docked packs: swap m docks into the slot it freed, due at swap n + m - k.
    dock1 = by_id["dock:1"]
    assert dock1.charger_id == "s0"
    assert dock1.arrival_s == T0
    assert dock1.departure_s == T0 + 3 * STEP
    assert len(sessions) == 8
    # Earlier in the queue, higher priority.
    priorities = [s.priority for s in sessions]
    assert priorities == sorted(priorities, reverse=True)


def test_demand_bound_brings_deadlines_forward() -> None:
    packs = _packs([0.9, 0.9, 0.9, 0.2])
    demand = [0.25] * 16  # one swap an hour
    plain = SwapStationSpec(service_level=1, demand_z=0.0)
    safe = SwapStationSpec(service_level=1, demand_z=2.33)
    due_plain = swap_sessions(plain, packs, demand, now=T0, step_s=STEP, columns=4)[3].departure_s
    due_safe = swap_sessions(safe, packs, demand, now=T0, step_s=STEP, columns=4)[3].departure_s
    assert due_safe < due_plain


@pytest.mark.parametrize(
    ("field", "value"),
    [("service_level", -1), ("target_soc", 1.5), ("demand_z", math.nan), ("arrival_soc", -0.1)],
)
def test_invalid_station_spec_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SwapStationSpec(**{"service_level": 1, field: value})  # type: ignore[arg-type]


def test_lp_plan_keeps_k_charged_packs_at_the_planned_swaps() -> None:
    spec = SwapStationSpec(service_level=2, target_soc=0.9, demand_z=0.0)
    packs = _packs([0.9, 0.9, 0.6, 0.4, 0.2, 0.1])
    steps = 32
    demand = [0.125] * steps  # a swap every 2 hours
    columns = 10
    sessions = swap_sessions(spec, packs, demand, now=T0, step_s=STEP, columns=columns)
    hours = ((T0 + STEP * np.arange(steps)) % 86400) / 3600
    price = np.where(hours < 4, 0.3, 1.0)
    d = Dispatcher([], steps, step_s=STEP, flex=FlexSpec(columns))
    plan = d.solve(
        DispatchInputs(
            time=T0,
            step_s=STEP,
            soc={},
            limits={},
            reserve_soc={},
            max_soc={},
            load_w=[1000.0] * steps,
            pv_w=[0.0] * steps,
            import_price=price.tolist(),
            export_price=[0.0] * steps,
            import_limit_w=200_000.0,
            sessions=sessions,
        ),
        budget_s=10.0,
        last_plan=None,
    )
    assert not plan.slack, plan.slack
    # Each session due within the horizon gets its energy before its deadline.
    end = T0 + STEP * steps
    due = [s for s in sessions if s.departure_s <= end]
    assert len(due) >= 6
    for s in due:
        p = -np.asarray(plan.session_power_w[s.id])
        t = T0 + STEP * np.arange(steps)
        before = t < max(s.departure_s, T0 + STEP)
        got = float(p[before].sum()) * STEP / 3600.0 * s.charge_efficiency
        assert got >= s.energy_needed_wh - 1.0, s.id


def test_swap_demand_learner_learns_hourly_counts() -> None:
    learner = SwapDemandLearner(weight=0.5, prior_per_hour=1.0)
    for day in range(4):
        base = T0 + day * 86400  # 08:00-09:00 busy, four days running
        for k in range(6):
            learner.observe(base + 8 * 3600 + k * 500)
    learner.close_hour(T0 + 4 * 86400)
    forecast = learner.forecast(T0 + 4 * 86400 + 8 * 3600, STEP, 8)
    # EWMA from 1 towards 6 by halves: 3.5, 4.75, 5.375, 5.6875 per hour.
    assert forecast[:4] == pytest.approx([5.6875 * STEP / 3600] * 4)
    # The hour after: quiet every day, learned down towards 0.
    assert forecast[4] == pytest.approx(1.0 / 16 * STEP / 3600)
