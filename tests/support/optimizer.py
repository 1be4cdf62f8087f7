"""Test support for the dispatch optimizer: instance generators and an independent reference.

The reference writes the dispatch LP (essd.dispatch.model) directly as ``scipy.optimize.linprog``
matrices (no cvxpy), following the semantics documented in ``essd.dispatch``: kW/kWh units,
carbon added to the import price, export price capped at the import price, the SoC window
relaxed to the fastest recovery path when the live SoC is outside it, soft site limits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from essd.dispatch import BatterySpec, DispatchInputs
from essd.domain import FallbackRung, LiveLimits, Plan

T0 = 1_767_225_600.0


@dataclass(frozen=True)
class ReferenceCosts:
    """The Dispatcher's constructor weights, repeated for the reference."""

    change_cost_per_kw: float = 0.001
    limit_violation_cost_per_kwh: float = 1000.0
    terminal_shortfall_cost_per_kwh: float = 1.0
    hold_value_per_kwh: float = 1e-5


@dataclass(frozen=True)
class ReferenceResult:
    """Objective (currency) and per-battery power (kW, battery sign) of the reference LP."""

    objective: float
    power_kw: np.ndarray
    grid_kw: np.ndarray


def reference_solve(
    batteries: Sequence[BatterySpec],
    inputs: DispatchInputs,
    costs: ReferenceCosts = ReferenceCosts(),
    *,
    one_direction: bool = False,
    ttl_s: float | None = None,
) -> ReferenceResult:
    """Solve the dispatch LP with scipy's HiGHS from hand-built sparse matrices.

    ``one_direction`` adds a binary per battery and step (charge or discharge, never both):
    the physical problem as a MILP, the yardstick for the direction fix.
    """
    nb, nt = len(batteries), len(inputs.load_w)
    h = inputs.step_s / 3600.0
    # Column layout: c[b,t], d[b,t], e[b,t] (end of step t), then g[t], gp[t], s_imp[t],
    # s_exp[t], pk, churn[b,t], short[b].
    nbt = nb * nt
    # Every setpoint change costs per unit on small sites, on the site's total beyond that
    # (the rule of essd.dispatch.model, restated here).
    per_unit = nb <= 8

    def ci(b: int, t: int) -> int:
        return b * nt + t

    off_c, off_d, off_e = 0, nbt, 2 * nbt
    off_g = 3 * nbt
    off_gp, off_si, off_se = off_g + nt, off_g + 2 * nt, off_g + 3 * nt
    off_pk = off_g + 4 * nt
    off_ch = off_pk + 1
    off_sh = off_ch + nbt
    off_z = off_sh + nb
    n = off_z + (nbt if one_direction else 0)
    cost = np.zeros(n)
    lb = np.zeros(n)
    ub = np.full(n, np.inf)
    rows_eq: list[tuple[dict[int, float], float]] = []
    rows_ub: list[tuple[dict[int, float], float]] = []

    load = np.asarray(inputs.load_w) / 1000
    pv = np.asarray(inputs.pv_w) / 1000
    carbon = (
        np.zeros(nt) if inputs.carbon_intensity is None else np.asarray(inputs.carbon_intensity)
    )
    p_imp = np.asarray(inputs.import_price) + inputs.carbon_price_per_kg * carbon
    p_exp = np.minimum(np.asarray(inputs.export_price), p_imp)
    tvalue = inputs.terminal_value_per_kwh
    # An infinite limit is simply no constraint here.
    imp_lim = inputs.import_limit_w / 1000
    exp_lim = inputs.export_limit_w / 1000

    # Recovery into the SoC window (see essd.dispatch.inputs.energy_window): batteries outside it
    # share the site's import (export) headroom in proportion to their charge (discharge) limit.
    def limit(spec: BatterySpec, t: int, charge: bool) -> float:
        here = list(inputs.availability.get(spec.id, [True] * nt))[t]
        lim = inputs.limits[spec.id]
        if not here:
            return 0.0
        if charge:
            return lim.max_charge_w / 1000
        return lim.max_discharge_w / 1000 if spec.can_discharge else 0.0

    reach = float(np.max(np.abs(load - pv)))
    reach += max(sum(limit(s, t, True) for s in batteries) for t in range(nt))
    reach += max(sum(limit(s, t, False) for s in batteries) for t in range(nt))
    room_imp = min(imp_lim, 2 * reach + 1) - (load - pv)
    room_exp = min(exp_lim, 2 * reach + 1) + (load - pv)
    T = range(nt)  # noqa: N806 - the horizon, as in the formulas
    low = [inputs.soc[s.id] < inputs.reserve_soc[s.id] for s in batteries]
    high = [inputs.soc[s.id] > inputs.max_soc[s.id] for s in batteries]
    want_c = [sum(limit(s, t, True) for s, w in zip(batteries, low, strict=True) if w) for t in T]
    want_d = [sum(limit(s, t, False) for s, w in zip(batteries, high, strict=True) if w) for t in T]

    def rate(spec: BatterySpec, t: int, charge: bool) -> float:
        want, room = (want_c[t], room_imp[t]) if charge else (want_d[t], room_exp[t])
        share = 1.0 if want == 0 else min(1.0, max(room, 0.0) / want)
        return limit(spec, t, charge) * share

    for b, spec in enumerate(batteries):
        cap = spec.capacity_wh / 1000
        lim: LiveLimits = inputs.limits[spec.id]
        avail = list(inputs.availability.get(spec.id, [True] * nt))
        e0 = inputs.soc[spec.id] * cap
        lo = inputs.reserve_soc[spec.id] * cap
        hi = inputs.max_soc[spec.id] * cap
        rec_lo, rec_hi = e0, e0
        for t in range(nt):
            ubc = lim.max_charge_w / 1000 if avail[t] else 0.0
            ubd = lim.max_discharge_w / 1000 if (avail[t] and spec.can_discharge) else 0.0
            ub[off_c + ci(b, t)] = ubc
            ub[off_d + ci(b, t)] = ubd
            if one_direction:
                # c <= ubc * z, d <= ubd * (1 - z), z binary
                ub[off_z + ci(b, t)] = 1.0
                rows_ub.append(({off_c + ci(b, t): 1.0, off_z + ci(b, t): -ubc}, 0.0))
                rows_ub.append(({off_d + ci(b, t): 1.0, off_z + ci(b, t): ubd}, ubd))
            # Fastest recovery into the window, step by step.
            rec_lo += h * spec.charge_efficiency * rate(spec, t, True)
            rec_hi -= h * rate(spec, t, False) / spec.discharge_efficiency
            e_lo = min(lo, rec_lo)
            e_hi = max(hi, rec_hi)
            lb[off_e + ci(b, t)] = min(e_lo, e_hi)
            ub[off_e + ci(b, t)] = e_hi
            if ttl_s is not None and ttl_s > inputs.step_s:
                # The guard's cap over a setpoint's TTL (essd.safety), from the energy at the
                # step's start: the live energy above reserve / below max for the first step,
                # the plan's energy within its window bounds for the later ones.
                k = ttl_s / 3600
                d_kw, c_kw = off_d + ci(b, t), off_c + ci(b, t)
                if t == 0:
                    rows_ub.append(({d_kw: k / spec.discharge_efficiency}, max(e0 - lo, 0.0)))
                    rows_ub.append(({c_kw: k * spec.charge_efficiency}, max(hi - e0, 0.0)))
                else:
                    prev = off_e + ci(b, t - 1)
                    rows_ub.append(({d_kw: k / spec.discharge_efficiency, prev: -1.0}, -lb[prev]))
                    rows_ub.append(({c_kw: k * spec.charge_efficiency, prev: 1.0}, ub[prev]))
            # e[t] - e[t-1] - h*eta_c*c + h*d/eta_d = (e0 if t == 0)
            row = {
                off_e + ci(b, t): 1.0,
                off_c + ci(b, t): -h * spec.charge_efficiency,
                off_d + ci(b, t): h / spec.discharge_efficiency,
            }
            if t > 0:
                row[off_e + ci(b, t - 1)] = -1.0
            rows_eq.append((row, e0 if t == 0 else 0.0))
            cost[off_e + ci(b, t)] -= costs.hold_value_per_kwh
            cost[off_c + ci(b, t)] += h * spec.degradation_cost_per_kwh
            cost[off_d + ci(b, t)] += h * spec.degradation_cost_per_kwh
        prev = inputs.previous_setpoint_w.get(spec.id, 0.0) / 1000
        # churn[0] >= |(d0 - c0) - prev|, churn[t] >= |(d_t - c_t) - (d_t-1 - c_t-1)|
        ch0 = off_ch + ci(b, 0)
        rows_ub.append(({off_d + ci(b, 0): 1.0, off_c + ci(b, 0): -1.0, ch0: -1.0}, prev))
        rows_ub.append(({off_d + ci(b, 0): -1.0, off_c + ci(b, 0): 1.0, ch0: -1.0}, -prev))
        for t in range(1, nt if per_unit else 1):
            move = {
                off_d + ci(b, t): 1.0,
                off_c + ci(b, t): -1.0,
                off_d + ci(b, t - 1): -1.0,
                off_c + ci(b, t - 1): 1.0,
            }
            rows_ub.append(({**move, off_ch + ci(b, t): -1.0}, 0.0))
            rows_ub.append(({**{k: -v for k, v in move.items()}, off_ch + ci(b, t): -1.0}, 0.0))
        cost[off_ch + ci(b, 0) : off_ch + ci(b, 0) + (nt if per_unit else 1)] = (
            costs.change_cost_per_kw
        )
        target = inputs.terminal_soc.get(spec.id, 0.0) * cap
        # e[T-1] + short >= target
        rows_ub.append(({off_e + ci(b, nt - 1): -1.0, off_sh + b: -1.0}, -target))
        cost[off_sh + b] = costs.terminal_shortfall_cost_per_kwh
        cost[off_e + ci(b, nt - 1)] -= tvalue

    if not per_unit:
        # The site's total moves: churn[0, t] >= |sum_b (d - c)[b, t] - (d - c)[b, t - 1]|, t >= 1
        # (the columns churn[b > 0, t >= 1] stay unused, at no cost).
        for t in range(1, nt):
            move: dict[int, float] = {}
            for b in range(nb):
                move[off_d + ci(b, t)] = 1.0
                move[off_c + ci(b, t)] = -1.0
                move[off_d + ci(b, t - 1)] = -1.0
                move[off_c + ci(b, t - 1)] = 1.0
            rows_ub.append(({**move, off_ch + ci(0, t): -1.0}, 0.0))
            rows_ub.append(({**{k: -v for k, v in move.items()}, off_ch + ci(0, t): -1.0}, 0.0))
            cost[off_ch + ci(0, t)] = costs.change_cost_per_kw
    lb[off_g : off_g + nt] = -np.inf
    for t in range(nt):
        # g - sum(c - d) = load - pv
        row = {off_g + t: 1.0}
        for b in range(nb):
            row[off_c + ci(b, t)] = -1.0
            row[off_d + ci(b, t)] = 1.0
        rows_eq.append((row, load[t] - pv[t]))
        rows_ub.append(({off_g + t: 1.0, off_gp + t: -1.0}, 0.0))  # g <= gp
        if math.isfinite(imp_lim):
            rows_ub.append(({off_g + t: 1.0, off_si + t: -1.0}, imp_lim))  # g <= lim + s
        if math.isfinite(exp_lim):
            rows_ub.append(({off_g + t: -1.0, off_se + t: -1.0}, exp_lim))  # -g <= lim + s
        rest = 1.0 - inputs.billed_elapsed_s / inputs.step_s
        if t == 0 and inputs.billed_elapsed_s > 0 and rest >= 1.0 / 3.0 - 1e-9:
            # The billing window under way: a share f of it measured with Q kWh imported, the
            # first step's import held for the rest r = 1 - f, so its average is
            # A = Q/h + r g[0], billed within the plan's peak when A <= P + pk. The window's
            # level W >= P is the new peak the plan expects to set anyway (E = W - P); pk / r
            # is stated as pk + E (1/r - 1), exact when pk = E (an excess then costs 1 / r
            # times; essd.dispatch.inputs.first_step_peak_kw):
            #   r g[0] - r pk <= W - Q/h - r (W - P)
            # (instances are chosen where its clip to the grid's reach does not bind). With
            # less than a third of the window ahead, the first step is stated as every other.
            threshold = inputs.peak_import_w / 1000
            level = (inputs.billed_peak_w or inputs.peak_import_w) / 1000
            so_far_kw = inputs.billed_import_wh / 1000 / h
            rhs = level - so_far_kw - rest * (level - threshold)
            rows_ub.append(({off_g: rest, off_pk: -rest}, rhs))
        else:
            rows_ub.append(({off_g + t: 1.0, off_pk: -1.0}, inputs.peak_import_w / 1000))
        cost[off_gp + t] = h * (p_imp[t] - p_exp[t])
        cost[off_g + t] = h * p_exp[t]
        cost[off_si + t] = h * costs.limit_violation_cost_per_kwh
        cost[off_se + t] = h * costs.limit_violation_cost_per_kwh
    cost[off_pk] = inputs.demand_charge_per_kw

    def matrix(rows: list[tuple[dict[int, float], float]]) -> tuple[sp.csr_array, np.ndarray]:
        r, c, v = [], [], []
        for i, (row, _) in enumerate(rows):
            for j, x in row.items():
                r.append(i)
                c.append(j)
                v.append(x)
        mat = sp.csr_array((v, (r, c)), shape=(len(rows), n))
        return mat, np.array([rhs for _, rhs in rows])

    a_eq, b_eq = matrix(rows_eq)
    a_ub, b_ub = matrix(rows_ub)
    if one_direction:
        integrality = np.zeros(n)
        integrality[off_z:] = 1
        res = milp(
            cost,
            constraints=[
                LinearConstraint(a_ub, -np.inf, b_ub),
                LinearConstraint(a_eq, b_eq, b_eq),
            ],
            bounds=Bounds(lb, ub),
            integrality=integrality,
            options={"mip_rel_gap": 1e-9},
        )
    else:
        res = linprog(
            cost,
            A_ub=a_ub,
            b_ub=b_ub,
            A_eq=a_eq,
            b_eq=b_eq,
            bounds=np.column_stack([lb, ub]),
            method="highs",
        )
    if res.status != 0:
        raise AssertionError(f"reference LP failed: {res.message}")
    x = res.x
    c = x[off_c : off_c + nbt].reshape(nb, nt)
    d = x[off_d : off_d + nbt].reshape(nb, nt)
    return ReferenceResult(float(res.fun), d - c, x[off_g : off_g + nt])


def random_fleet(rng: np.random.Generator, nb: int) -> list[BatterySpec]:
    """``nb`` batteries of varied size, efficiency and cost; some without discharge."""
    return [
        BatterySpec(
            id=f"bat{i}",
            capacity_wh=float(rng.uniform(2e3, 30e3)),
            charge_efficiency=float(rng.uniform(0.85, 1.0)),
            discharge_efficiency=float(rng.uniform(0.85, 1.0)),
            degradation_cost_per_kwh=float(rng.uniform(0.01, 0.08)),
            can_discharge=bool(rng.random() > 0.2),
        )
        for i in range(nb)
    ]


def random_inputs(
    rng: np.random.Generator,
    batteries: Sequence[BatterySpec],
    steps: int,
    *,
    step_s: float = 900.0,
    time: float = T0,
    negative_prices: bool = False,
) -> DispatchInputs:
    """Valid random inputs: daily load/PV shapes, prices, limits, availability gaps."""
    nb = len(batteries)
    hours = np.arange(steps) * step_s / 3600
    scale = 1000.0 * max(nb, 1)
    load = scale * rng.uniform(0.3, 2.0) * (1 + 0.5 * np.sin(2 * np.pi * hours / 24))
    load = load * rng.uniform(0.7, 1.3, steps)
    pv = np.maximum(0, scale * rng.uniform(0, 4) * np.sin(2 * np.pi * (hours - 6) / 24))
    price = 0.2 + 0.1 * np.sin(2 * np.pi * (hours - 18) / 24) + 0.05 * rng.standard_normal(steps)
    if negative_prices:
        price = price - 0.3
    export = price * rng.uniform(0.2, 0.9) - 0.02
    if rng.random() < 0.3:
        # Some steps pay more for export than import costs (the LP caps them: essd.dispatch).
        spikes = rng.random(steps) < 0.2
        export = np.where(spikes, price + 0.05, export)
    availability = {}
    for b in batteries:
        if rng.random() < 0.3:
            mask = np.ones(steps, dtype=bool)
            start = int(rng.integers(0, steps))
            mask[start : start + int(rng.integers(1, max(2, steps // 2)))] = False
            availability[b.id] = [bool(x) for x in mask]
    reserve = {b.id: float(rng.uniform(0.0, 0.3)) for b in batteries}
    return DispatchInputs(
        time=time,
        step_s=step_s,
        soc={b.id: float(rng.uniform(0.0, 1.0)) for b in batteries},
        limits={
            b.id: LiveLimits(
                float(b.capacity_wh * rng.uniform(0.1, 1.0)),
                float(b.capacity_wh * rng.uniform(0.1, 1.0)),
            )
            for b in batteries
        },
        reserve_soc=reserve,
        max_soc={b.id: float(rng.uniform(max(0.7, reserve[b.id]), 1.0)) for b in batteries},
        load_w=load.tolist(),
        pv_w=pv.tolist(),
        import_price=price.tolist(),
        export_price=export.tolist(),
        availability=availability,
        carbon_intensity=rng.uniform(0.05, 0.5, steps).tolist(),
        carbon_price_per_kg=float(rng.choice([0.0, 0.08])),
        demand_charge_per_kw=float(rng.choice([0.0, 0.0, 3.0, 12.0])),
        peak_import_w=float(scale * rng.uniform(0, 2)),
        import_limit_w=float(rng.choice([math.inf, scale * rng.uniform(1, 4)])),
        export_limit_w=float(rng.choice([math.inf, 0.0, scale * rng.uniform(0.5, 3)])),
        previous_setpoint_w={b.id: float(rng.uniform(-500, 500)) for b in batteries},
        terminal_soc={b.id: float(rng.uniform(0, 0.5)) for b in batteries if rng.random() < 0.5},
        terminal_value_per_kwh=float(rng.uniform(0, 0.2)),
    )


def simulate_soc(
    spec: BatterySpec, soc0: float, power_w: Sequence[float], step_s: float
) -> list[float]:
    """SoC after each step when ``power_w`` (battery sign) is applied, for honesty checks."""
    e = soc0 * spec.capacity_wh
    out = [soc0]
    for p in power_w:
        if p < 0:
            e += -p * spec.charge_efficiency * step_s / 3600
        else:
            e -= p / spec.discharge_efficiency * step_s / 3600
        out.append(e / spec.capacity_wh)
    return out


def agrees_with_reference(plan: Plan, ref: ReferenceResult) -> bool:
    """Assert ``plan`` is as good as the reference's optimum: equal to 1e-4, or, for a plan
    whose charge/discharge overlap was fixed by re-solving (see Dispatcher), feasible for the
    LP and so never better. True when compared for equality."""
    assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
    if "re-solve" in plan.reason:
        assert plan.objective >= ref.objective - 1e-6 * max(1.0, abs(ref.objective))
        return False
    assert abs(plan.objective - ref.objective) <= max(1e-4 * abs(ref.objective), 1e-6), (
        plan.objective,
        ref.objective,
    )
    return True
