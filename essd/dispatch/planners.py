"""The planners below the optimizer on the fallback ladder: rule-based self-consumption within
limits (rung 4) and safe idle (rung 5). Battery W > 0 discharges, < 0 charges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from essd.dispatch.inputs import (
    BatterySpec,
    DispatchInputs,
    InvalidDispatchInputsError,
    validate_inputs,
)
from essd.dispatch.simulate import make_plan, plan_cost, simulate_plan
from essd.domain import FallbackRung, Plan, PlanCause


def rule_based_plan(
    batteries: Sequence[BatterySpec],
    inputs: DispatchInputs,
    *,
    reason: str = "rule-based self-consumption",
    cause: PlanCause = PlanCause.INVALID_INPUTS,
) -> Plan:
    """Self-consumption without an optimizer: discharge to cover load, charge from PV surplus.

    Each step the residual load (load - pv) is shared among the batteries in proportion to
    what each can still deliver (live limit, availability, SoC down to reserve) or absorb (up
    to max SoC); nothing is bought from the grid to charge and nothing is exported from a
    battery. Prices only feed ``plan.objective`` (energy, carbon, wear and demand cost), so
    zeros do when no tariff is known. Raises InvalidDispatchInputsError for invalid inputs (the
    horizon is ``len(load_w)``); without valid inputs use :func:`safe_idle_plan`.
    """
    steps = len(inputs.load_w)
    a = validate_inputs(batteries, steps, inputs)
    eta_c = np.array([b.charge_efficiency for b in batteries])
    eta_d = np.array([b.discharge_efficiency for b in batteries])
    nb = len(batteries)
    p = np.zeros((nb, steps))
    cur = a.e0.copy()
    for t in range(steps):
        r = a.net[t]
        can_d = np.minimum(a.ub_d[:, t], np.maximum(cur - a.lo, 0.0) * eta_d / a.h)
        can_c = np.minimum(a.ub_c[:, t], np.maximum(a.hi - cur, 0.0) / (eta_c * a.h))
        if r > 0 and can_d.sum() > 0:
            p[:, t] = can_d * min(1.0, r / can_d.sum())
        elif r < 0 and can_c.sum() > 0:
            p[:, t] = -can_c * min(1.0, -r / can_c.sum())
        cur = cur + a.h * np.where(p[:, t] < 0, -p[:, t] * eta_c, -p[:, t] / eta_d)
    # The rule keeps the plain window; the simulation makes the SoC prediction exact.
    lo = np.minimum(a.lo, a.e0)[:, None] * np.ones((1, steps))
    hi = np.maximum(a.hi, a.e0)[:, None] * np.ones((1, steps))
    p, e = simulate_plan(batteries, a, p, lo, hi)
    cost, _ = plan_cost(batteries, a, p)
    return make_plan(
        batteries,
        inputs,
        a,
        p,
        e,
        objective=cost,
        status="rule_based",
        rung=FallbackRung.RULE_BASED,
        reason=reason,
        cause=cause,
    )


def safe_idle_plan(
    device_ids: Sequence[str],
    *,
    time: float,
    step_s: float,
    steps: int,
    soc: Mapping[str, float] | None = None,
    net_load_w: Sequence[float] | None = None,
    reason: str = "safe idle",
    cause: PlanCause = PlanCause.INVALID_INPUTS,
) -> Plan:
    """0 W for every device over the horizon: the last rung, needs no valid inputs at all.

    The predicted SoC stays at ``soc`` (NaN where unknown) and the grid at ``net_load_w``
    (load - pv; NaN when unknown).
    """
    known = soc or {}
    grid = tuple(float(x) for x in net_load_w) if net_load_w is not None else (math.nan,) * steps
    if len(grid) != steps:
        raise InvalidDispatchInputsError(
            "net_load_w", f"must have {steps} entries, got {len(grid)}"
        )
    return Plan(
        created_at=time,
        step_s=step_s,
        device_ids=tuple(device_ids),
        power_w=dict.fromkeys(device_ids, (0.0,) * steps),
        soc={d: (float(known.get(d, math.nan)),) * (steps + 1) for d in device_ids},
        grid_w=grid,
        objective=math.nan,
        solver_status="idle",
        rung=FallbackRung.SAFE_IDLE,
        reason=reason,
        cause=cause,
    )
