"""A plan from per-step battery power: the energy it leaves in each battery, the grid power and
cost it implies, and the Plan record (kW/kWh inside, W/Wh in the Plan; battery > 0 discharges).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from essd.dispatch.inputs import BatterySpec, DispatchArrays, DispatchInputs
from essd.domain import FallbackRung, Plan, PlanCause

FloatArray = npt.NDArray[np.float64]


def stored_energy(
    batteries: Sequence[BatterySpec], a: DispatchArrays, power_kw: FloatArray
) -> FloatArray:
    """Energy (kWh) at the end of each step when ``power_kw`` (B, T; battery sign) is applied."""
    eta_c = np.reshape([b.charge_efficiency for b in batteries], (len(batteries), 1))
    eta_d = np.reshape([b.discharge_efficiency for b in batteries], (len(batteries), 1))
    flow = a.h * (eta_c * np.maximum(-power_kw, 0.0) - np.maximum(power_kw, 0.0) / eta_d)
    energy: FloatArray = a.e0[:, None] + np.cumsum(flow, axis=1)
    return energy


def simulate_plan(
    batteries: Sequence[BatterySpec],
    a: DispatchArrays,
    power_kw: FloatArray,
    e_lo: FloatArray,
    e_hi: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Apply ``power_kw`` (B, T; battery sign) step by step, clipped to limits and SoC window.

    Returns the power actually possible and the energy at the end of each step (kWh): the
    honest SoC prediction of a plan, whatever produced it.
    """
    eta_c = np.array([b.charge_efficiency for b in batteries])
    eta_d = np.array([b.discharge_efficiency for b in batteries])
    p = np.clip(power_kw, -a.ub_c, a.ub_d)
    e = np.empty_like(p)
    cur = a.e0.copy()
    for t in range(p.shape[1]):
        # Most a battery can still charge / discharge this step without leaving its window.
        room_c = np.maximum(e_hi[:, t] - cur, 0.0) / (eta_c * a.h)
        room_d = np.maximum(cur - e_lo[:, t], 0.0) * eta_d / a.h
        pt = np.clip(p[:, t], -room_c, room_d)
        p[:, t] = pt
        cur = cur + a.h * np.where(pt < 0, -pt * eta_c, -pt / eta_d)
        e[:, t] = cur
    return p, e


def plan_cost(
    batteries: Sequence[BatterySpec], a: DispatchArrays, power_kw: FloatArray
) -> tuple[float, FloatArray]:
    """Energy, carbon, degradation and demand cost of a plan (currency), and its grid kW."""
    grid = a.net - power_kw.sum(axis=0)
    deg = np.array([b.degradation_cost_per_kwh for b in batteries])
    cost = a.h * float(a.price_imp @ np.maximum(grid, 0.0) - a.price_exp @ np.maximum(-grid, 0.0))
    cost += a.h * float(deg @ np.abs(power_kw).sum(axis=1))
    cost += a.demand_charge * max(float(grid.max(initial=0.0)) - a.peak_kw, 0.0)
    return cost, grid


def make_plan(
    batteries: Sequence[BatterySpec],
    inputs: DispatchInputs,
    a: DispatchArrays,
    power_kw: FloatArray,
    e: FloatArray,
    *,
    objective: float,
    status: str,
    rung: FallbackRung,
    reason: str,
    cause: PlanCause,
    slack: Mapping[str, float] | None = None,
    solve_s: float = 0.0,
) -> Plan:
    grid = a.net - power_kw.sum(axis=0)
    ids = tuple(b.id for b in batteries)
    soc = {
        b.id: (float(inputs.soc[b.id]), *(e[k] / (b.capacity_wh / 1000.0)).tolist())
        for k, b in enumerate(batteries)
    }
    return Plan(
        created_at=inputs.time,
        step_s=inputs.step_s,
        device_ids=ids,
        power_w={b.id: tuple((power_kw[k] * 1000.0).tolist()) for k, b in enumerate(batteries)},
        soc=soc,
        grid_w=tuple((grid * 1000.0).tolist()),
        objective=objective,
        solver_status=status,
        rung=rung,
        reason=reason,
        cause=cause,
        slack=dict(slack or {}),
        solve_s=solve_s,
    )
