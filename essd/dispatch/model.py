"""The dispatch LP: a parameterized cvxpy problem for one topology and step length, compiled
once and re-solved every cycle with new parameter values.

Sign conventions: battery power W > 0 discharges into the site, < 0 charges; grid power W > 0
imports. Internally the LP works in kW and kWh (prices are per kWh), which keeps its
coefficients near 1 for the solver.

The LP (docs/architecture.md, "Dispatch"), per battery b and step t, with ``h`` the step in
hours:

- charge ``c[b,t]`` in [0, ub_c], discharge ``d[b,t]`` in [0, ub_d] (AC side, kW); the bounds are
  live limit x availability (0 where a portable unit is away; ub_d = 0 when a unit has no
  discharge setpoint);
- stored energy at the end of each step ``e[b,t] = e[b,t-1] + h*(eta_c*c - d/eta_d)`` (kWh)
  inside the SoC window [reserve, max]; when the live SoC is already outside the window the
  bound becomes a recovery path that fits the site's import/export headroom (see
  :func:`essd.dispatch.inputs.energy_window`), so live data can never make the problem
  infeasible, and the rung is SOFT with the violation published as slack;
- grid ``g[t] = load - pv + sum_b (c - d)`` with import ``gp >= max(g, 0)``; soft site import
  and export limits (slack priced at ``limit_violation_cost_per_kwh``);
- a peak variable above the running billing-period peak for the demand charge, planned
  against the import plus a per-step margin for forecast error (``pk_margin``); the first
  step's threshold holds the average of the clock-aligned billing window already under way
  (what the meter measured of it plus the plan for the rest, see
  :func:`essd.dispatch.inputs.first_step_peak_kw`);
- PV curtailment ``curt[t]`` in [0, pv] where the site's inverters can curtail (else [0, 0]),
  which raises the grid by as much: a zero-export site with more PV than load and storage
  can take plans the curtailment the inverters will do, instead of violating its limit.

Objective: import cost - export revenue (carbon price x intensity added to the import price),
degradation cost per kWh throughput, demand charge per kW of new peak, a penalty per kW of
change of the first-step setpoint from the previous one, minus a terminal value per kWh stored
at the end, plus a penalty per kWh short of a terminal SoC target, minus a tie-breaking value
(:data:`HOLD_VALUE_PER_KWH`) per kWh held per step.

When the export price exceeds the import price the true cost of a single meter,
``pi_i*max(g,0) - pi_e*max(-g,0)``, is concave in ``g`` and an LP would import and export at
once. Such steps use ``pi_e = pi_i`` (export valued at the import price): conservative, and
the cost stays convex.

Every per-cycle number enters through a ``cp.Parameter`` and products of two inputs (limit x
availability, import - export price, carbon price x intensity) are formed in numpy before they
are assigned, so the problem is DPP and compiled once (``problem.is_dpp()`` is tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cvxpy
import numpy as np
import numpy.typing as npt

from essd.dispatch.flex import FlexModel, FlexSpec
from essd.dispatch.highs import HighsHotStart
from essd.dispatch.inputs import BatterySpec, DispatchArrays, energy_window
from essd.dispatch.lpmaps import set_parameter

# Value of one kWh held for one step: far below any price difference, it only breaks ties.
# Where storing now or later costs the same (PV surplus exported at a flat price), the plan
# charges first and discharges last, so a forecast that was too hopeful about the rest of
# the day finds the battery as full as it could be.
HOLD_VALUE_PER_KWH = 1e-5

# Up to this many units every unit's every setpoint change costs; beyond it each unit's first
# change and every change of the site's total do (per-unit changes along the whole horizon
# made a 100 x 288 re-solve 20-100x slower: 43 s against 0.44 s, measured).
PER_UNIT_CHURN_MAX_UNITS = 8


# cvxpy re-exports its atoms through star imports that mypy cannot follow; treat it as untyped.
cp: Any = cvxpy


FloatArray = npt.NDArray[np.float64]


class DispatchModel:
    """The cvxpy problem for one topology and step length; parameters set per solve."""

    def __init__(
        self,
        batteries: Sequence[BatterySpec],
        steps: int,
        h: float,
        *,
        change_cost_per_kw: float,
        violation_cost_per_kwh: float,
        terminal_shortfall_cost_per_kwh: float,
        hold_value_per_kwh: float = HOLD_VALUE_PER_KWH,
        flex: FlexSpec | None = None,
        setpoint_ttl_h: float | None = None,
    ) -> None:
        nb, nt = len(batteries), steps
        self.batteries = tuple(batteries)
        self.h = h
        self.steps = nt
        # Flexible loads (EV sessions, swap packs; essd.dispatch.flex), None without columns.
        fm: FlexModel | None = flex.model(nt, h) if flex is not None else None
        self.flex = fm
        # (B, T) also for B = 0 (a site of flexible loads only).
        ones = np.ones((1, nt))
        eta_c = np.reshape([b.charge_efficiency for b in batteries], (nb, 1)) * ones
        inv_eta_d = np.reshape([1 / b.discharge_efficiency for b in batteries], (nb, 1)) * ones
        deg = np.reshape([b.degradation_cost_per_kwh for b in batteries], (nb, 1)) * ones

        # No sign attributes: cvxpy then skips a value check per assignment, and validation
        # has already established the signs.
        p = self.params = {
            "ub_c": cp.Parameter((nb, nt), name="ub_c"),
            "ub_d": cp.Parameter((nb, nt), name="ub_d"),
            "e_lo": cp.Parameter((nb, nt), name="e_lo"),
            "e_hi": cp.Parameter((nb, nt), name="e_hi"),
            "e0": cp.Parameter(nb, name="e0"),
            "net": cp.Parameter(nt, name="net"),
            "w_imp": cp.Parameter(nt, name="w_imp"),
            "w_exp": cp.Parameter(nt, name="w_exp"),
            "imp_lim": cp.Parameter(name="imp_lim"),
            "exp_lim": cp.Parameter(name="exp_lim"),
            # Per step: the first step's threshold accounts for the billing window so far.
            "peak": cp.Parameter(nt, name="peak"),
            "demand": cp.Parameter(name="demand"),
            "prev": cp.Parameter(nb, name="prev"),
            "target": cp.Parameter(nb, name="target"),
            "tvalue": cp.Parameter(name="tvalue"),
            "curt_ub": cp.Parameter(nt, name="curt_ub"),
            "pk_margin": cp.Parameter(nt, name="pk_margin"),
        }
        c = self.c = cp.Variable((nb, nt), name="charge_kw", bounds=[0, p["ub_c"]])
        d = self.d = cp.Variable((nb, nt), name="discharge_kw", bounds=[0, p["ub_d"]])
        e = self.e = cp.Variable((nb, nt), name="energy_kwh", bounds=[p["e_lo"], p["e_hi"]])
        g = self.g = cp.Variable(nt, name="grid_kw")
        # PV curtailed (kW): up to the forecast PV where the inverters can curtail, else 0.
        curt = self.curt = cp.Variable(nt, name="curtailed_kw", bounds=[0, p["curt_ub"]])
        gp = cp.Variable(nt, name="import_kw", nonneg=True)
        s_imp = self.s_imp = cp.Variable(nt, name="import_slack_kw", nonneg=True)
        s_exp = self.s_exp = cp.Variable(nt, name="export_slack_kw", nonneg=True)
        pk = cp.Variable(name="new_peak_kw", nonneg=True)
        per_unit = nb <= PER_UNIT_CHURN_MAX_UNITS
        churn = cp.Variable((nb, nt if per_unit else 1), name="change_kw", nonneg=True)
        site_churn = None if per_unit else cp.Variable(nt, name="site_change_kw", nonneg=True)
        short = cp.Variable(nb, name="terminal_short_kwh", nonneg=True)
        # A copy of the final energy: ``e`` has parameter bounds, and cvxpy counts a parameter
        # times such a variable as parameter x parameter (not DPP).
        e_end = cp.Variable(nb, name="final_energy_kwh")

        flow = h * (cp.multiply(eta_c, c) - cp.multiply(inv_eta_d, d))
        power = d - c
        first = power[:, 0]
        constraints = [
            e[:, 0] == p["e0"] + flow[:, 0],
            e[:, 1:] == e[:, :-1] + flow[:, 1:],
            # Flexible loads (EV sessions, swap packs) draw from the same site balance.
            g == p["net"] + cp.sum(c - d, axis=0) + curt + (fm.site_kw if fm else 0),
            gp >= g,
            g <= p["imp_lim"] + s_imp,
            g >= -p["exp_lim"] - s_exp,
            pk >= g + p["pk_margin"] - p["peak"],
            churn[:, 0] >= first - p["prev"],
            churn[:, 0] >= p["prev"] - first,
            e_end == e[:, nt - 1],
            e_end + short >= p["target"],
        ]
        if nt > 1:
            # Every change of setpoint costs, not only the first: otherwise a plan that starts
            # "next step" is as good as one that starts now, and every cycle defers it again.
            if site_churn is None:
                moves = power[:, 1:] - power[:, :-1]
                constraints += [churn[:, 1:] >= moves, churn[:, 1:] >= -moves]
            else:
                total = cp.sum(power, axis=0)
                moves = total[1:] - total[:-1]
                constraints += [site_churn[1:] >= moves, site_churn[1:] >= -moves]
        # Optional rows, last so the others keep their order: the guard's TTL cap.
        if setpoint_ttl_h is not None:
            constraints += _ttl_rows(
                p, c, d, e, k=(setpoint_ttl_h * eta_c, setpoint_ttl_h * inv_eta_d)
            )
        objective = (
            h * (p["w_imp"] @ gp + p["w_exp"] @ g)
            + h * cp.sum(cp.multiply(deg, c + d))
            + p["demand"] * pk
            + change_cost_per_kw * cp.sum(churn)
            + (0 if site_churn is None else change_cost_per_kw * cp.sum(site_churn))
            - p["tvalue"] * cp.sum(e_end)
            - hold_value_per_kwh * cp.sum(e)
            + terminal_shortfall_cost_per_kwh * cp.sum(short)
            + violation_cost_per_kwh * h * cp.sum(s_imp + s_exp)
        )
        if fm is not None:
            constraints += fm.constraints
            objective += fm.cost
        self.problem = cp.Problem(cp.Minimize(objective), constraints)
        self.hot: HighsHotStart | None = None
        # floor(time / step) of the last solve's horizon start (see Dispatcher._optimize).
        self.step_index: int | None = None

    def compile(self, solver: str) -> None:
        """Let cvxpy compile the problem (DPP: once) with placeholder parameter values."""
        for param in self.params.values():
            if param.value is None:
                param.value = np.zeros(param.shape)
        self.problem.get_problem_data(solver, enforce_dpp=True)

    def assign(
        self, a: DispatchArrays, ub_c: FloatArray, ub_d: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Set every parameter from validated inputs; returns the energy window used."""
        if self.flex is not None:
            self.flex.refresh()
        e_lo, e_hi = energy_window(self.batteries, a, ub_c, ub_d)
        # Per step: the first step's threshold holds the billing window under way.
        peak = np.full(self.steps, a.peak_kw)
        peak[0] = a.peak_first_kw
        values = {
            "ub_c": ub_c,
            "ub_d": ub_d,
            "e_lo": e_lo,
            "e_hi": e_hi,
            "e0": a.e0,
            "net": a.net,
            "w_imp": a.price_imp - a.price_exp,
            "w_exp": a.price_exp,
            "imp_lim": a.imp_lim,
            "exp_lim": a.exp_lim,
            "peak": peak,
            "demand": a.demand_charge,
            "prev": a.prev_kw,
            "target": a.target_e,
            "tvalue": a.terminal_value,
            "curt_ub": a.curt_ub,
            "pk_margin": a.peak_margin,
        }
        if "cap_d0" in self.params:
            values["cap_d0"] = np.maximum(a.e0 - a.lo, 0.0)
            values["cap_c0"] = np.maximum(a.hi - a.e0, 0.0)
        for name, value in values.items():
            # The inputs are validated (essd.dispatch.inputs); skip cvxpy's own value check.
            set_parameter(self.params[name], value)
        return e_lo, e_hi


def _ttl_rows(
    p: dict[str, Any], c: Any, d: Any, e: Any, *, k: tuple[FloatArray, FloatArray]
) -> list[Any]:
    """The guard's cap on a setpoint (essd.safety): what the SoC allows over its whole TTL
    (discharge * TTL / eta_d <= energy above reserve, charge * TTL * eta_c <= room below max),
    from the energy when the setpoint is written: the live energy for the first step, the
    plan's energy at the step's start for the later ones (their window bounds standing for
    reserve and max). Only where the TTL outlasts the step does it bind before the window
    does (Dispatcher: ``setpoint_ttl_s``)."""
    k_c, k_d = k
    nb, nt = k_c.shape
    p["cap_d0"] = cp.Parameter(nb, name="cap_d0")
    p["cap_c0"] = cp.Parameter(nb, name="cap_c0")
    rows = [
        cp.multiply(k_d[:, 0], d[:, 0]) <= p["cap_d0"],
        cp.multiply(k_c[:, 0], c[:, 0]) <= p["cap_c0"],
    ]
    if nt > 1:
        rows += [
            cp.multiply(k_d[:, 1:], d[:, 1:]) <= e[:, :-1] - p["e_lo"][:, :-1],
            cp.multiply(k_c[:, 1:], c[:, 1:]) <= p["e_hi"][:, :-1] - e[:, :-1],
        ]
    return rows
