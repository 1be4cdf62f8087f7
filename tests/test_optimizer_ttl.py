"""The guard's cap over a setpoint's TTL, known to the plan (essd.dispatch.model ``_ttl_rows``):
with a TTL longer than the step, the guard (essd.safety) lets a unit discharge only what its SoC
allows over the whole TTL; the plan stays within that instead of being cut on its last step
before the reserve."""

from __future__ import annotations

import numpy as np

from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs
from essd.domain import FallbackRung, LiveLimits
from tests.support.optimizer import (
    T0,
    agrees_with_reference,
    random_fleet,
    random_inputs,
    reference_solve,
)

STEP = 900.0
STEPS = 6
BAT = BatterySpec(id="bat", capacity_wh=40_000.0, charge_efficiency=0.95, discharge_efficiency=0.95)


def _guard_cap_w(soc: float, ttl_s: float) -> float:
    """essd.safety._device_bounds' discharge cap for this unit (reserve 0.1)."""
    return max(0.0, (soc - 0.1) * BAT.capacity_wh * BAT.discharge_efficiency) / (ttl_s / 3600.0)


def _inputs() -> DispatchInputs:
    # An evening of dear import: the battery (0.5 SoC, 16 kWh above reserve) covers the load.
    return DispatchInputs(
        time=T0,
        step_s=STEP,
        soc={"bat": 0.5},
        limits={"bat": LiveLimits(20_000.0, 20_000.0)},
        reserve_soc={"bat": 0.1},
        max_soc={"bat": 1.0},
        load_w=[18_000.0] * STEPS,
        pv_w=[0.0] * STEPS,
        import_price=[0.4] * STEPS,
        export_price=[0.05] * STEPS,
    )


def test_the_plan_is_what_the_guard_lets_through() -> None:
    """TTL two steps (one cycle per step): every planned discharge is within the guard's cap
    at the SoC the plan has at that step's start; without the rows the step before the
    reserve is planned at more than the guard would let through."""
    ttl = 2 * STEP
    capped = Dispatcher([BAT], STEPS, setpoint_ttl_s=ttl).solve(
        _inputs(), budget_s=10.0, last_plan=None
    )
    plain = Dispatcher([BAT], STEPS).solve(_inputs(), budget_s=10.0, last_plan=None)
    for plan in (capped, plain):
        assert plan.rung is FallbackRung.OPTIMAL, plan.reason
    over = []
    for plan in (capped, plain):
        soc = plan.soc["bat"]
        over.append(
            max(p - _guard_cap_w(s, ttl) for p, s in zip(plan.power_w["bat"], soc, strict=False))
        )
    assert over[0] <= 1.0
    assert over[1] > 1_000.0


def test_a_ttl_within_the_step_changes_nothing() -> None:
    """The cap binds before the SoC window only where the TTL outlasts the step."""
    a = Dispatcher([BAT], STEPS, setpoint_ttl_s=60.0).solve(
        _inputs(), budget_s=10.0, last_plan=None
    )
    b = Dispatcher([BAT], STEPS).solve(_inputs(), budget_s=10.0, last_plan=None)
    assert a.power_w == b.power_w


def test_the_ttl_rows_match_the_reference() -> None:
    """Random instances with a TTL of two steps: objective within 1e-4 of the scipy reference
    (which states the cap per battery and step itself)."""
    rng = np.random.default_rng(53)
    compared = bound = 0
    for steps, nb in ((6, 1), (24, 1), (12, 2), (24, 3)):
        fleet = random_fleet(rng, nb)
        dispatcher = Dispatcher(fleet, steps, setpoint_ttl_s=1800.0)
        assert dispatcher._lp_maps(dispatcher._model(900.0)) is not None  # fast path
        for _ in range(8):
            inputs = random_inputs(rng, fleet, steps)
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            ref = reference_solve(fleet, inputs, ttl_s=1800.0)
            bound += ref.objective > reference_solve(fleet, inputs).objective + 1e-6
            compared += agrees_with_reference(plan, ref)
    assert compared >= 24
    # The cap does bind on some of them (the LP without it finds a cheaper plan there).
    assert bound >= 3
