"""Receding-horizon dispatch: a parameterized cvxpy LP, re-solved every cycle, and its fallbacks.

Sign conventions: battery power W > 0 discharges into the site, < 0 charges; grid power W > 0
imports. SoC is a ratio 0..1. Internally the LP works in kW and kWh (prices are per kWh), which
keeps its coefficients near 1 for the solver.

The LP (DESIGN.md, "Dispatch optimization"), per battery b and step t, with ``h`` the step in
hours:

- charge ``c[b,t]`` in [0, ub_c], discharge ``d[b,t]`` in [0, ub_d] (AC side, kW); the bounds are
  live limit x availability (0 where a portable unit is away; ub_d = 0 when a unit has no
  discharge setpoint);
- stored energy at the end of each step ``e[b,t] = e[b,t-1] + h*(eta_c*c - d/eta_d)`` (kWh)
  inside the SoC window [reserve, max]; when the live SoC is already outside the window the
  bound becomes a recovery path that fits the site's import/export headroom (see
  :func:`_energy_window`), so live data can never make the problem infeasible, and the rung
  is SOFT with the violation published as slack;
- grid ``g[t] = load - pv + sum_b (c - d)`` with import ``gp >= max(g, 0)``; soft site import
  and export limits (slack priced at ``limit_violation_cost_per_kwh``);
- a peak variable above the running billing-period peak for the demand charge.

Objective: import cost - export revenue (carbon price x intensity added to the import price),
degradation cost per kWh throughput, demand charge per kW of new peak, a penalty per kW of
change of the first-step setpoint from the previous one, minus a terminal value per kWh stored
at the end, plus a penalty per kWh short of a terminal SoC target.

When the export price exceeds the import price the true cost of a single meter,
``pi_i*max(g,0) - pi_e*max(-g,0)``, is concave in ``g`` and an LP would import and export at
once. Such steps use ``pi_e = pi_i`` (export valued at the import price): conservative, and
the cost stays convex.

Every per-cycle number enters through a ``cp.Parameter`` and products of two inputs (limit x
availability, import - export price, carbon price x intensity) are formed in numpy before they
are assigned, so the problem is DPP and compiled once (``problem.is_dpp()`` is tested).

Solver and speed (figures from ``benchmarks/bench_optimizer.py`` on the 2-core dev machine):
HiGHS, chosen by measurement: through cvxpy a 10 x 96 re-solve took 24 ms with HiGHS and
50 ms with Clarabel (1 x 96: 6.4 vs 8.0 ms; ECOS is not installed). Parameters only enter
costs, bounds and right-hand sides, so the constraint matrix never changes and HiGHS is kept
between cycles and hot-started from its last basis (:class:`_HighsHotStart`): the median
100 x 288 re-solve went from seconds (2.4-5 s cold through cvxpy) to ~0.3 s, 10 x 288 from
125 ms to 25 ms. Only the first solve, and re-solves where the horizon moves on a step, pay
for more simplex iterations.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cvxpy
import highspy
import numpy as np
import numpy.typing as npt
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS as CVXPY_HIGHS

from essd.domain import FallbackRung, LiveLimits, Plan, PlanCause
from essd.ladder import descend

# cvxpy re-exports its atoms through star imports that mypy cannot follow; treat it as untyped.
cp: Any = cvxpy
_highspy: Any = highspy


def _silence_highs_banner() -> None:
    """HiGHS prints its copyright banner to stdout (fd 1) when the first instance of a process
    is built, whatever ``output_flag`` says later; under systemd that lands in the journal and
    in a terminal it breaks the view. Build that first instance with fd 1 on /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            _highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_silence_highs_banner()

__all__ = [
    "DEFAULT_SOLVER",
    "BatterySpec",
    "DispatchInputs",
    "Dispatcher",
    "InvalidDispatchInputsError",
    "SolveTiming",
    "SolverHealth",
    "rule_based_plan",
    "safe_idle_plan",
    "validate_inputs",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# A power below this (kW) counts as zero when checking for simultaneous charge and discharge
# and for slack: solvers return 1e-9-ish residues, a real setpoint is watts.
_TOL_KW = 1e-5
# How often a solve is repeated with the direction fixed where the LP both charged and
# discharged one battery in one step (see Dispatcher docstring).
_MAX_DIRECTION_FIXES = 6
# From this many LP columns on, a cold solve (no basis yet) runs HiGHS's interior point method.
_IPM_COLD_COLUMNS = 30_000
# Solver used when the caller does not choose: picked by measurement (benchmarks/).
DEFAULT_SOLVER = "HIGHS"
# After this many solves in a row fail other than by running out of their budget, the
# persistent solver is thrown away and rebuilt cold (see Dispatcher.health).
DEFAULT_REBUILD_AFTER_FAILURES = 3
# A solve stopped by its time limit is a plain budget overrun only if the solver used at least
# this share of the time it was given; one stopped sooner has a broken clock or state.
_OVERRUN_MIN_SHARE = 0.5
# HiGHS model status name -> cvxpy status, as cvxpy's own HiGHS interface maps them.
_HIGHS_STATUS: Mapping[str, str] = CVXPY_HIGHS.STATUS_MAP


class InvalidDispatchInputsError(ValueError):
    """Inputs that cannot be dispatched; ``field`` names the offending input."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True, slots=True)
class BatterySpec:
    """The fixed description of one storage unit (part of the site topology).

    ``capacity_wh``: usable energy at SoC 1. Efficiencies are one-way ratios in (0, 1]:
    ``charge_efficiency`` from AC to stored energy, ``discharge_efficiency`` from stored energy
    to AC. ``degradation_cost_per_kwh`` is charged per kWh of AC throughput in either direction.
    ``can_discharge`` is False for a unit with only a charge-rate limit (a portable power
    station): the optimizer then only ever plans charging (power_w <= 0) for it.
    """

    id: str
    capacity_wh: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    degradation_cost_per_kwh: float = 0.0
    can_discharge: bool = True

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidDispatchInputsError("id", "must be a non-empty string")
        if not math.isfinite(self.capacity_wh) or self.capacity_wh <= 0:
            raise InvalidDispatchInputsError(
                f"batteries[{self.id}].capacity_wh", f"must be > 0, got {self.capacity_wh!r}"
            )
        for name in ("charge_efficiency", "discharge_efficiency"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise InvalidDispatchInputsError(
                    f"batteries[{self.id}].{name}", f"must be in (0, 1], got {v!r}"
                )
        v = self.degradation_cost_per_kwh
        if not (math.isfinite(v) and v >= 0):
            raise InvalidDispatchInputsError(
                f"batteries[{self.id}].degradation_cost_per_kwh", f"must be >= 0, got {v!r}"
            )


@dataclass(frozen=True, slots=True)
class DispatchInputs:
    """Everything one cycle's dispatch depends on. Units are in the field names.

    Per-battery fields are keyed by battery id. Per-step sequences have one entry per step of
    the horizon starting at ``time`` (epoch s), each step ``step_s`` long. Power in W (battery
    sign > 0 discharges; grid sign > 0 imports), prices per kWh, carbon in kg/kWh and per kg.

    - ``load_w``: site consumption not served by ``pv_w``; it may be negative (net load of a
      site whose unmeasured PV exports, as a net-load forecaster predicts it, with ``pv_w``
      0). ``pv_w``: measured PV generation, >= 0. The grid without batteries is
      ``load_w - pv_w`` either way.
    - ``soc``: live SoC ratio; ``limits``: live power limits (W magnitudes).
    - ``availability``: per step, False while a unit is away; a missing id means always there.
    - ``reserve_soc`` / ``max_soc``: the SoC window.
    - ``import_limit_w`` / ``export_limit_w``: site limits, ``math.inf`` for none, 0 for zero
      export. ``peak_import_w``: the billing period's running peak so far.
    - ``previous_setpoint_w``: the first-step setpoint applied last cycle (missing id = 0 W).
    - ``terminal_soc``: a soft minimum SoC at the end of the horizon (missing id = none);
      ``terminal_value_per_kwh``: value of energy left stored at the end.
    """

    time: float
    step_s: float
    soc: Mapping[str, float]
    limits: Mapping[str, LiveLimits]
    reserve_soc: Mapping[str, float]
    max_soc: Mapping[str, float]
    load_w: Sequence[float]
    pv_w: Sequence[float]
    import_price: Sequence[float]
    export_price: Sequence[float]
    availability: Mapping[str, Sequence[bool]] = field(default_factory=dict)
    carbon_intensity: Sequence[float] | None = None
    carbon_price_per_kg: float = 0.0
    demand_charge_per_kw: float = 0.0
    peak_import_w: float = 0.0
    import_limit_w: float = math.inf
    export_limit_w: float = math.inf
    previous_setpoint_w: Mapping[str, float] = field(default_factory=dict)
    terminal_soc: Mapping[str, float] = field(default_factory=dict)
    terminal_value_per_kwh: float = 0.0


@dataclass(frozen=True, slots=True)
class _Arrays:
    """Validated inputs as numpy arrays in kW / kWh, battery order of the topology."""

    h: float  # step length in hours
    e0: FloatArray  # (B,) kWh
    ub_c: FloatArray  # (B, T) kW
    ub_d: FloatArray  # (B, T) kW
    lo: FloatArray  # (B,) kWh, reserve
    hi: FloatArray  # (B,) kWh, max
    net: FloatArray  # (T,) kW, load - pv
    price_imp: FloatArray  # (T,) per kWh, carbon included
    price_exp: FloatArray  # (T,) per kWh, capped at price_imp
    demand_charge: float
    peak_kw: float
    imp_lim: float  # kW
    exp_lim: float  # kW
    prev_kw: FloatArray  # (B,) battery sign
    target_e: FloatArray  # (B,) kWh, 0 where none
    terminal_value: float


def _check_finite(name: str, v: float, *, lo: float | None = None, allow_inf: bool = False) -> None:
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise InvalidDispatchInputsError(name, f"must be a finite number, got {v!r}")
    if lo is not None and v < lo:
        raise InvalidDispatchInputsError(name, f"must be >= {lo}, got {v!r}")


def _series(
    name: str, values: Sequence[float] | None, steps: int, *, lo: float | None = None
) -> FloatArray:
    if values is None:
        return np.zeros(steps)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidDispatchInputsError(name, f"must be a sequence of numbers ({exc})") from None
    if arr.shape != (steps,):
        raise InvalidDispatchInputsError(
            name, f"must have {steps} entries (one per step), got {arr.size}"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidDispatchInputsError(f"{name}[{i}]", f"must be a finite number, got {arr[i]!r}")
    if lo is not None and (arr < lo).any():
        i = int(np.argmax(arr < lo))
        raise InvalidDispatchInputsError(f"{name}[{i}]", f"must be >= {lo}, got {arr[i]!r}")
    return arr


def _per_battery(name: str, values: Mapping[str, Any], ids: Sequence[str]) -> None:
    extra = sorted(set(values) - set(ids))
    if extra:
        raise InvalidDispatchInputsError(f"{name}[{extra[0]}]", "is not a battery of this site")
    for i in ids:
        if i not in values:
            raise InvalidDispatchInputsError(f"{name}[{i}]", "is missing")


def _ratio(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise InvalidDispatchInputsError(name, f"must be a ratio in [0, 1], got {v!r}")
    return v


def _availability(inputs: DispatchInputs, battery_id: str, steps: int) -> BoolArray:
    if battery_id not in inputs.availability:
        return np.ones(steps, dtype=bool)
    raw = inputs.availability[battery_id]
    name = f"availability[{battery_id}]"
    if len(raw) != steps:
        raise InvalidDispatchInputsError(name, f"must have {steps} entries, got {len(raw)}")
    if not all(isinstance(x, bool | np.bool_) for x in raw):
        raise InvalidDispatchInputsError(name, "must be booleans")
    return np.asarray(raw, dtype=bool)


def validate_inputs(
    batteries: Sequence[BatterySpec], steps: int, inputs: DispatchInputs
) -> _Arrays:
    """Check ``inputs`` against the topology and convert them to kW/kWh arrays.

    Raises InvalidDispatchInputsError (a ValueError) naming the first offending field.
    """
    ids = [b.id for b in batteries]
    _check_finite("time", inputs.time)
    _check_finite("step_s", inputs.step_s)
    if inputs.step_s <= 0:
        raise InvalidDispatchInputsError("step_s", f"must be > 0, got {inputs.step_s!r}")
    for name in ("soc", "limits", "reserve_soc", "max_soc"):
        _per_battery(name, getattr(inputs, name), ids)
    for name in ("availability", "previous_setpoint_w", "terminal_soc"):
        extra = sorted(set(getattr(inputs, name)) - set(ids))
        if extra:
            raise InvalidDispatchInputsError(f"{name}[{extra[0]}]", "is not a battery of this site")
    nb = len(batteries)
    h = inputs.step_s / 3600.0
    cap = np.array([b.capacity_wh / 1000.0 for b in batteries])
    soc = np.array([_ratio(f"soc[{i}]", inputs.soc[i]) for i in ids])
    lo = np.array([_ratio(f"reserve_soc[{i}]", inputs.reserve_soc[i]) for i in ids])
    hi = np.array([_ratio(f"max_soc[{i}]", inputs.max_soc[i]) for i in ids])
    target = np.array([_ratio(f"terminal_soc[{i}]", inputs.terminal_soc.get(i, 0.0)) for i in ids])
    prev = np.zeros(nb)
    ub_c = np.empty((nb, steps))
    ub_d = np.empty((nb, steps))
    for k, b in enumerate(batteries):
        if lo[k] > hi[k]:
            raise InvalidDispatchInputsError(
                f"reserve_soc[{b.id}]", f"must not exceed max_soc ({lo[k]!r} > {hi[k]!r})"
            )
        lim = inputs.limits[b.id]
        if not isinstance(lim, LiveLimits):
            raise InvalidDispatchInputsError(f"limits[{b.id}]", "must be an essd.domain.LiveLimits")
        avail = _availability(inputs, b.id, steps)
        ub_c[k] = avail * (lim.max_charge_w / 1000.0)
        ub_d[k] = avail * (lim.max_discharge_w / 1000.0 if b.can_discharge else 0.0)
        v = float(inputs.previous_setpoint_w.get(b.id, 0.0))
        _check_finite(f"previous_setpoint_w[{b.id}]", v)
        prev[k] = v / 1000.0
    # Net consumption: negative where unmeasured PV exports (DispatchInputs docstring).
    load = _series("load_w", inputs.load_w, steps)
    pv = _series("pv_w", inputs.pv_w, steps, lo=0.0)
    p_imp = _series("import_price", inputs.import_price, steps)
    p_exp = _series("export_price", inputs.export_price, steps)
    carbon = _series("carbon_intensity", inputs.carbon_intensity, steps, lo=0.0)
    _check_finite("carbon_price_per_kg", inputs.carbon_price_per_kg, lo=0.0)
    _check_finite("demand_charge_per_kw", inputs.demand_charge_per_kw, lo=0.0)
    _check_finite("peak_import_w", inputs.peak_import_w, lo=0.0)
    _check_finite("import_limit_w", inputs.import_limit_w, lo=0.0, allow_inf=True)
    _check_finite("export_limit_w", inputs.export_limit_w, lo=0.0, allow_inf=True)
    _check_finite("terminal_value_per_kwh", inputs.terminal_value_per_kwh, lo=0.0)
    price_imp = p_imp + inputs.carbon_price_per_kg * carbon
    # The grid can never carry more than this, so "no limit" becomes this (not inf, not 1e9:
    # a huge right-hand side ruins the scaling of interior-point solvers).
    reach = float(np.max(np.abs(load - pv))) / 1000.0
    reach = 2.0 * (reach + float(ub_c.sum(0).max() + ub_d.sum(0).max())) + 1.0
    return _Arrays(
        h=h,
        e0=soc * cap,
        ub_c=ub_c,
        ub_d=ub_d,
        lo=lo * cap,
        hi=hi * cap,
        net=(load - pv) / 1000.0,
        price_imp=price_imp,
        price_exp=np.minimum(p_exp, price_imp),
        demand_charge=float(inputs.demand_charge_per_kw),
        peak_kw=inputs.peak_import_w / 1000.0,
        imp_lim=min(inputs.import_limit_w / 1000.0, reach),
        exp_lim=min(inputs.export_limit_w / 1000.0, reach),
        prev_kw=prev,
        target_e=target * cap,
        terminal_value=float(inputs.terminal_value_per_kwh),
    )


def _energy_window(
    batteries: Sequence[BatterySpec], a: _Arrays, ub_c: FloatArray, ub_d: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per-step energy bounds (B, T), kWh, that live data can always satisfy.

    Inside the window they are [reserve, max]. A battery that starts below reserve must climb
    back as fast as it can without pushing the site over its import limit (its share of the
    import headroom, never more than its own limit) and never sinks lower; one above max
    comes down likewise within the export headroom (or stays put if it cannot discharge).
    That path is feasible by construction, so the SoC window is soft only where the present
    forces it, and the site limits keep precedence over the recovery.
    """
    eta_c = np.array([b.charge_efficiency for b in batteries])
    eta_d = np.array([b.discharge_efficiency for b in batteries])
    rate_c = _share(ub_c, a.e0 < a.lo, np.maximum(a.imp_lim - a.net, 0.0))
    rate_d = _share(ub_d, a.e0 > a.hi, np.maximum(a.exp_lim + a.net, 0.0))
    up = np.cumsum(a.h * eta_c[:, None] * rate_c, axis=1)
    down = np.cumsum(a.h * rate_d / eta_d[:, None], axis=1)
    lo = np.minimum(a.lo[:, None], a.e0[:, None] + up)
    hi = np.maximum(a.hi[:, None], a.e0[:, None] - down)
    # Keep the bounds ordered even for a window [reserve, max] of zero width.
    return np.minimum(lo, hi), hi


def _share(limit: FloatArray, recovering: BoolArray, headroom: FloatArray) -> FloatArray:
    """Per-battery recovery rate (B, T): ``headroom`` shared in proportion to ``limit``."""
    rate = limit * recovering[:, None]
    total = rate.sum(axis=0)
    # Only scale down where the batteries want more than the headroom (no tiny divisors).
    scale: FloatArray = np.divide(
        headroom, total, out=np.ones_like(total), where=total > np.maximum(headroom, 0.0)
    )
    shared: FloatArray = rate * np.minimum(scale, 1.0)
    return shared


class _Model:
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
    ) -> None:
        nb, nt = len(batteries), steps
        self.batteries = tuple(batteries)
        self.h = h
        eta_c = np.array([[b.charge_efficiency] for b in batteries]) * np.ones((1, nt))
        inv_eta_d = np.array([[1.0 / b.discharge_efficiency] for b in batteries]) * np.ones((1, nt))
        deg = np.array([[b.degradation_cost_per_kwh] for b in batteries]) * np.ones((1, nt))

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
            "peak": cp.Parameter(name="peak"),
            "demand": cp.Parameter(name="demand"),
            "prev": cp.Parameter(nb, name="prev"),
            "target": cp.Parameter(nb, name="target"),
            "tvalue": cp.Parameter(name="tvalue"),
        }
        c = self.c = cp.Variable((nb, nt), name="charge_kw", bounds=[0, p["ub_c"]])
        d = self.d = cp.Variable((nb, nt), name="discharge_kw", bounds=[0, p["ub_d"]])
        e = self.e = cp.Variable((nb, nt), name="energy_kwh", bounds=[p["e_lo"], p["e_hi"]])
        g = self.g = cp.Variable(nt, name="grid_kw")
        gp = cp.Variable(nt, name="import_kw", nonneg=True)
        s_imp = self.s_imp = cp.Variable(nt, name="import_slack_kw", nonneg=True)
        s_exp = self.s_exp = cp.Variable(nt, name="export_slack_kw", nonneg=True)
        pk = cp.Variable(name="new_peak_kw", nonneg=True)
        churn = cp.Variable(nb, name="change_kw", nonneg=True)
        short = cp.Variable(nb, name="terminal_short_kwh", nonneg=True)
        # A copy of the final energy: ``e`` has parameter bounds, and cvxpy counts a parameter
        # times such a variable as parameter x parameter (not DPP).
        e_end = cp.Variable(nb, name="final_energy_kwh")

        flow = h * (cp.multiply(eta_c, c) - cp.multiply(inv_eta_d, d))
        first = d[:, 0] - c[:, 0]
        constraints = [
            e[:, 0] == p["e0"] + flow[:, 0],
            e[:, 1:] == e[:, :-1] + flow[:, 1:],
            g == p["net"] + cp.sum(c - d, axis=0),
            gp >= g,
            g <= p["imp_lim"] + s_imp,
            g >= -p["exp_lim"] - s_exp,
            pk >= g - p["peak"],
            churn >= first - p["prev"],
            churn >= p["prev"] - first,
            e_end == e[:, nt - 1],
            e_end + short >= p["target"],
        ]
        objective = (
            h * (p["w_imp"] @ gp + p["w_exp"] @ g)
            + h * cp.sum(cp.multiply(deg, c + d))
            + p["demand"] * pk
            + change_cost_per_kw * cp.sum(churn)
            - p["tvalue"] * cp.sum(e_end)
            + terminal_shortfall_cost_per_kwh * cp.sum(short)
            + violation_cost_per_kwh * h * cp.sum(s_imp + s_exp)
        )
        self.problem = cp.Problem(cp.Minimize(objective), constraints)
        self.hot: _HighsHotStart | None = None

    def compile(self, solver: str) -> None:
        """Let cvxpy compile the problem (DPP: once) with placeholder parameter values."""
        for param in self.params.values():
            if param.value is None:
                param.value = np.zeros(param.shape)
        self.problem.get_problem_data(solver, enforce_dpp=True)

    def assign(
        self, a: _Arrays, ub_c: FloatArray, ub_d: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Set every parameter from validated inputs; returns the energy window used."""
        e_lo, e_hi = _energy_window(self.batteries, a, ub_c, ub_d)
        p = self.params
        p["ub_c"].value = ub_c
        p["ub_d"].value = ub_d
        p["e_lo"].value = e_lo
        p["e_hi"].value = e_hi
        p["e0"].value = a.e0
        p["net"].value = a.net
        p["w_imp"].value = a.price_imp - a.price_exp
        p["w_exp"].value = a.price_exp
        p["imp_lim"].value = a.imp_lim
        p["exp_lim"].value = a.exp_lim
        p["peak"].value = a.peak_kw
        p["demand"].value = a.demand_charge
        p["prev"].value = a.prev_kw
        p["target"].value = a.target_e
        p["tvalue"].value = a.terminal_value
        return e_lo, e_hi


class _HighsHotStart:
    """Re-solves one parameterized cvxpy LP with a persistent HiGHS instance.

    cvxpy maps the parameters to solver data (DPP: a sparse product, no recompilation), but its
    HiGHS interface builds a fresh ``highspy.Highs`` per solve, so every cycle starts simplex
    from scratch. In this LP the parameters only enter costs, bounds and right-hand sides: the
    constraint matrix is fixed, so the previous HiGHS model is kept and only those vectors are
    replaced; HiGHS then starts from the previous optimal basis (a hot start). A cycle's data
    differs little from the last one's, so that basis is nearly optimal: at 100 batteries x
    288 steps a cold solve takes tens of thousands of simplex iterations, a re-solve hundreds.
    The result goes back through cvxpy (``unpack_results``) so variables read as usual.
    """

    def __init__(self, problem: cp.Problem, options: Mapping[str, Any]) -> None:
        self._problem = problem
        self._options = dict(options)
        self._highs: Any = None
        self._a_data: FloatArray | None = None
        self.last_solver_s = 0.0
        # HiGHS's model status name of the last run ("kOptimal", "kTimeLimit", ...).
        self.last_model_status = ""

    def reset(self) -> None:
        """Forget the HiGHS model (next solve starts cold)."""
        self._highs = None
        self._a_data = None

    def _new_highs(
        self,
        a_mat: Any,
        cost: FloatArray,
        col_bounds: tuple[FloatArray, FloatArray],
        row_bounds: tuple[FloatArray, FloatArray],
    ) -> Any:
        """A HiGHS instance holding the LP (one passModel, as cvxpy's own interface does)."""
        h = _highspy.Highs()
        h.setOptionValue("output_flag", False)
        # Devex pricing instead of dual steepest edge: no exact edge weights to rebuild on
        # every hot start; measured at 100 x 288: first solve 12.6 s instead of 18-23 s,
        # re-solve at a step boundary ~2.0 s instead of ~2.5-3.4 s, others unchanged.
        h.setOptionValue("simplex_dual_edge_weight_strategy", 1)
        for name, value in self._options.items():
            h.setOptionValue(name, value)
        lp = _highspy.HighsLp()
        lp.num_row_, lp.num_col_ = a_mat.shape
        lp.col_cost_ = cost
        lp.col_lower_, lp.col_upper_ = col_bounds
        lp.row_lower_, lp.row_upper_ = row_bounds
        lp.a_matrix_.format_ = _highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = a_mat.indptr
        lp.a_matrix_.index_ = a_mat.indices
        lp.a_matrix_.value_ = a_mat.data
        h.passModel(lp)
        self._highs = h
        self._a_data = a_mat.data.copy()
        # Without a basis to start from, a large LP solves faster by interior point (with
        # crossover, which leaves the basis the next cycles hot-start from): measured at
        # 100 x 288, 6.2-7.5 s against 12.6 s of dual simplex; below ~30k columns simplex wins.
        if a_mat.shape[1] >= _IPM_COLD_COLUMNS and "solver" not in self._options:
            h.setOptionValue("solver", "ipm")
        return h

    def solve(self, time_limit_s: float) -> str:
        """Solve with the parameters' current values; returns the cvxpy status."""
        data, chain, inverse = self._problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        a_mat = data["A"].tocsc()
        n_rows, n_cols = a_mat.shape
        n_eq = int(data["dims"].zero)
        row_up = np.asarray(data["b"], dtype=np.float64)
        row_lo = row_up.copy()
        row_lo[n_eq:] = -np.inf
        lb = data.get("lower_bounds")
        ub = data.get("upper_bounds")
        col_lo = np.full(n_cols, -np.inf) if lb is None else np.asarray(lb, dtype=np.float64)
        col_up = np.full(n_cols, np.inf) if ub is None else np.asarray(ub, dtype=np.float64)
        cost = np.asarray(data["c"], dtype=np.float64)
        same_matrix = self._a_data is not None and np.array_equal(self._a_data, a_mat.data)
        if self._highs is None or not same_matrix:
            h = self._new_highs(a_mat, cost, (col_lo, col_up), (row_lo, row_up))
        else:
            h = self._highs
            cols = np.arange(n_cols, dtype=np.int32)
            h.changeColsCost(n_cols, cols, cost)
            h.changeColsBounds(n_cols, cols, col_lo, col_up)
            h.changeRowsBounds(n_rows, np.arange(n_rows, dtype=np.int32), row_lo, row_up)
        # HiGHS checks time_limit against the instance's run clock, which adds up every run()
        # so far (ERGO-Code/HiGHS#1331, #1477; highspy 1.16 has no zeroAllClocks): a plain
        # time_limit = budget failed every solve from the 2,105th on (4 x 96, budget 2 s).
        # So the limit is this run's budget on top of the clock's reading (as HiGHS.jl does).
        h.setOptionValue("time_limit", float(h.getRunTime() + max(time_limit_s, 1e-3)))
        started = time.perf_counter()
        h.run()
        self.last_solver_s = time.perf_counter() - started
        if "solver" not in self._options:
            # Re-solves go on from a basis: simplex. Also after a cold IPM run cut short by the
            # time limit: IPM cannot resume, while simplex progress carries over to the next
            # cycle, so a too-short budget still converges.
            h.setOptionValue("solver", "simplex")
        status = h.getModelStatus()
        self.last_model_status = str(status.name)
        results: dict[str, Any] = {
            "solution": h.getSolution(),
            "basis": h.getBasis(),
            "info": h.getInfo(),
            "model_status": status.name,
            "run_time": self.last_solver_s,
        }
        if status.name != "kOptimal":
            # A run stopped by the time limit leaves a valid simplex basis: the next cycle goes
            # on from it (so a too-short budget still converges over a few cycles). After an
            # error the basis cannot be trusted: start cold next time.
            if status.name not in ("kTimeLimit", "kIterationLimit"):
                self.reset()
            return str(_HIGHS_STATUS.get(status.name, cp.SOLVER_ERROR))
        self._problem.unpack_results(results, chain, inverse)
        return str(self._problem.status)


def _energy(batteries: Sequence[BatterySpec], a: _Arrays, power_kw: FloatArray) -> FloatArray:
    """Energy (kWh) at the end of each step when ``power_kw`` (B, T; battery sign) is applied."""
    eta_c = np.array([[b.charge_efficiency] for b in batteries])
    eta_d = np.array([[b.discharge_efficiency] for b in batteries])
    flow = a.h * (eta_c * np.maximum(-power_kw, 0.0) - np.maximum(power_kw, 0.0) / eta_d)
    energy: FloatArray = a.e0[:, None] + np.cumsum(flow, axis=1)
    return energy


def _simulate(
    batteries: Sequence[BatterySpec],
    a: _Arrays,
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


def _cost(
    batteries: Sequence[BatterySpec], a: _Arrays, power_kw: FloatArray
) -> tuple[float, FloatArray]:
    """Energy, carbon, degradation and demand cost of a plan (currency), and its grid kW."""
    grid = a.net - power_kw.sum(axis=0)
    deg = np.array([b.degradation_cost_per_kwh for b in batteries])
    cost = a.h * float(a.price_imp @ np.maximum(grid, 0.0) - a.price_exp @ np.maximum(-grid, 0.0))
    cost += a.h * float(deg @ np.abs(power_kw).sum(axis=1))
    cost += a.demand_charge * max(float(grid.max(initial=0.0)) - a.peak_kw, 0.0)
    return cost, grid


def _make_plan(
    batteries: Sequence[BatterySpec],
    inputs: DispatchInputs,
    a: _Arrays,
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
    p, e = _simulate(batteries, a, p, lo, hi)
    cost, _ = _cost(batteries, a, p)
    return _make_plan(
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


def _solved_reason(slack: Mapping[str, float], fixed: int, overlap: bool) -> str:
    if slack:
        # Worst first, at most three: the reason is a short line; the slack map has them all.
        worst = sorted(slack.items(), key=lambda kv: -kv[1])
        reason = "soft constraints violated: " + ", ".join(f"{k} by {v:.4g}" for k, v in worst[:3])
        if len(worst) > 3:
            reason += f" and {len(worst) - 3} more"
    else:
        reason = "optimal"
    notes = []
    if fixed:
        notes.append(f"{fixed} re-solve(s) to fix charge/discharge direction")
    if overlap:
        notes.append("remaining overlap applied as net power")
    return reason + (" (" + "; ".join(notes) + ")" if notes else "")


class _SolveFailedError(Exception):
    """The optimizer produced no usable plan; the message is the reason.

    ``overrun``: the solve merely ran out of its time budget (the solver is fine, the budget
    short); otherwise the solver failed and the failure counts towards a rebuild.
    """

    def __init__(self, cause: PlanCause, reason: str, *, overrun: bool) -> None:
        super().__init__(reason)
        self.cause = cause
        self.overrun = overrun


@dataclass(frozen=True, slots=True)
class SolveTiming:
    """Where the last solve's time went, seconds: total, inside the solver, solves run."""

    total_s: float
    solver_s: float
    solves: int

    @property
    def cvxpy_s(self) -> float:
        """Time outside the solver (parameter mapping, cvxpy and result handling)."""
        return max(self.total_s - self.solver_s, 0.0)


@dataclass(frozen=True, slots=True)
class SolverHealth:
    """Whether the optimizer's solver still works, for metrics and alerts.

    A solve *fails* when it ends without a plan for any reason other than running out of its
    time budget: a non-optimal solver status (infeasible, error, a limit hit long before the
    budget was used) or an exception. A budget overrun neither counts as a failure nor ends
    a streak (a large site may need a few cycles of a short budget to converge); a solve that
    returns an optimized plan (rung 1 or 2) ends it.

    - ``solver_failures_consecutive``: failed solves since the last successful one (a gauge;
      0 when healthy).
    - ``solver_failures_total``: failed solves since the Dispatcher was built (a counter).
    - ``solver_rebuilds_total``: times the solver was thrown away and rebuilt cold because
      ``rebuild_after_failures`` solves in a row failed (a counter; see :class:`Dispatcher`).
    """

    solver_failures_consecutive: int = 0
    solver_failures_total: int = 0
    solver_rebuilds_total: int = 0


FallbackPlanner = Callable[[Sequence[BatterySpec], DispatchInputs], Plan]


class Dispatcher:
    """The dispatch optimizer for one site topology; build once, call :meth:`solve` per cycle.

    Simultaneous charge and discharge: with negative prices (or zero export and surplus PV)
    and no degradation cost the LP can profit from burning energy in a battery's round-trip
    losses by charging and discharging it in the same step. No real unit does both at once:
    the setpoint is one signed number, so such a plan would be applied as ``d - c`` and the
    unit would end up with more energy than the LP predicted. Instead of a MILP (binary per
    battery and step, measured ~380x slower) each step where a battery both charges and
    discharges is restricted to discharging (its charge bound set to 0 through the bound
    parameters) and the LP is re-solved (hot-started, so cheap), at most six times (one to
    three re-solves settle every instance seen in tests). The result is feasible for the
    physical (mixed-integer) problem; on adversarial instances (full batteries, hours of
    negative prices, zero degradation cost) it is 10-25 % short of the MILP optimum, which
    tests check against scipy's MILP. Should overlap remain, its net power is applied through
    a step-by-step simulation that clips it to limits and SoC window. Either way the published
    SoC is the one the published setpoints produce with the battery's efficiencies: honest.

    A solver that keeps failing is rebuilt: after ``rebuild_after_failures`` failed solves in a
    row (and after every further ``rebuild_after_failures``; see :class:`SolverHealth` for
    what counts), the persistent HiGHS instances are dropped, so the next solve starts cold
    from a fresh one (other solvers: the cvxpy problem is rebuilt and recompiled). A HiGHS
    instance left in a bad state (as its accumulating run clock once left it, see
    ``_HighsHotStart.solve``) would otherwise fail every cycle from then on. :attr:`health`
    holds the counters.

    Not thread-safe: one :meth:`solve` at a time per instance (the daemon's worker thread);
    :attr:`health` may be read from any thread (it is replaced whole, never mutated).
    """

    def __init__(
        self,
        batteries: Sequence[BatterySpec],
        steps: int,
        *,
        solver: str = DEFAULT_SOLVER,
        step_s: float = 900.0,
        change_cost_per_kw: float = 0.001,
        limit_violation_cost_per_kwh: float = 1000.0,
        terminal_shortfall_cost_per_kwh: float = 1.0,
        solver_options: Mapping[str, Any] | None = None,
        fallback_planner: FallbackPlanner = rule_based_plan,
        hot_start: bool = True,
        rebuild_after_failures: int = DEFAULT_REBUILD_AFTER_FAILURES,
    ) -> None:
        if not batteries:
            raise InvalidDispatchInputsError("batteries", "at least one battery is needed")
        ids = [b.id for b in batteries]
        if len(set(ids)) != len(ids):
            raise InvalidDispatchInputsError("batteries", f"battery ids must be unique, got {ids}")
        if steps < 1:
            raise InvalidDispatchInputsError("steps", f"must be >= 1, got {steps!r}")
        if rebuild_after_failures < 1:
            raise InvalidDispatchInputsError(
                "rebuild_after_failures", f"must be >= 1, got {rebuild_after_failures!r}"
            )
        for name, v in (
            ("step_s", step_s),
            ("change_cost_per_kw", change_cost_per_kw),
            ("limit_violation_cost_per_kwh", limit_violation_cost_per_kwh),
            ("terminal_shortfall_cost_per_kwh", terminal_shortfall_cost_per_kwh),
        ):
            _check_finite(name, v, lo=0.0)
        if solver not in cp.installed_solvers():
            raise InvalidDispatchInputsError("solver", f"{solver!r} is not installed")
        self.batteries = tuple(batteries)
        self.steps = steps
        self.solver = solver
        # The persistent-HiGHS path (see _HighsHotStart); other solvers go through cvxpy.
        self._hot_start = hot_start and solver == "HIGHS"
        self._solver_options = dict(solver_options or {})
        self._costs = {
            "change_cost_per_kw": change_cost_per_kw,
            "violation_cost_per_kwh": limit_violation_cost_per_kwh,
            "terminal_shortfall_cost_per_kwh": terminal_shortfall_cost_per_kwh,
        }
        self._fallback = fallback_planner
        self._models: dict[float, _Model] = {}
        self.last_timing = SolveTiming(0.0, 0.0, 0)
        self._rebuild_after = rebuild_after_failures
        self._health = SolverHealth()
        # Build and compile the default model now, not in the first cycle's time budget.
        self._model(step_s).compile(self.solver)

    @property
    def health(self) -> SolverHealth:
        """Solver failure and rebuild counters (see :class:`SolverHealth`)."""
        return self._health

    @property
    def device_ids(self) -> tuple[str, ...]:
        """Battery ids in the order of the topology."""
        return tuple(b.id for b in self.batteries)

    def _model(self, step_s: float) -> _Model:
        model = self._models.get(step_s)
        if model is None:
            model = _Model(self.batteries, self.steps, step_s / 3600.0, **self._costs)
            self._models[step_s] = model
        return model

    def problem(self, step_s: float = 900.0) -> cp.Problem:
        """The cvxpy problem solved for steps of ``step_s`` (for inspection and tests)."""
        return self._model(step_s).problem

    def validate(self, inputs: DispatchInputs) -> None:
        """Raise InvalidDispatchInputsError (a ValueError naming the field) for unusable inputs."""
        validate_inputs(self.batteries, self.steps, inputs)

    def solve(self, inputs: DispatchInputs, *, budget_s: float, last_plan: Plan | None) -> Plan:
        """Plan the horizon, walking down the fallback ladder when the solve fails or is late.

        Raises InvalidDispatchInputsError only for invalid inputs or budget (before solving);
        otherwise returns a plan whose ``rung`` and ``reason`` say how it was made. On rung 2
        ``plan.slack`` holds ``import_limit_w`` / ``export_limit_w`` (worst excess, W) and
        ``reserve_soc[<id>]`` / ``max_soc[<id>]`` (how far the live SoC is outside, ratio).
        ``last_plan``: the last plan applied; used (shifted to now) if this solve fails and it
        was an optimized plan for the same batteries that still covers the present.
        """
        if not (math.isfinite(budget_s) and budget_s > 0):
            raise InvalidDispatchInputsError("budget_s", f"must be > 0, got {budget_s!r}")
        a = validate_inputs(self.batteries, self.steps, inputs)
        # Real compute time, not the injectable clock: the budget is about this thread's work.
        started = time.perf_counter()
        try:
            plan = self._optimize(inputs, a, budget_s, started)
        except _SolveFailedError as exc:
            cause, reason = exc.cause, str(exc)
            if not exc.overrun:
                reason += self._solver_failed()
        except Exception as exc:  # any solver failure must end on a lower rung
            cause = PlanCause.SOLVER_ERROR
            reason = f"solver error after {time.perf_counter() - started:.2f} s: {exc}"
            reason += self._solver_failed()
        else:
            health = self._health
            if health.solver_failures_consecutive:
                self._health = SolverHealth(
                    solver_failures_consecutive=0,
                    solver_failures_total=health.solver_failures_total,
                    solver_rebuilds_total=health.solver_rebuilds_total,
                )
            return plan
        return self.fallback(inputs, last_plan, reason, cause=cause)

    def _solver_failed(self) -> str:
        """Count a failed solve; rebuild the solver every ``rebuild_after_failures`` in a row.

        Returns a note for the plan's reason ("" when nothing was rebuilt).
        """
        health = self._health
        streak = health.solver_failures_consecutive + 1
        rebuild = streak % self._rebuild_after == 0
        self._health = SolverHealth(
            solver_failures_consecutive=streak,
            solver_failures_total=health.solver_failures_total + 1,
            solver_rebuilds_total=health.solver_rebuilds_total + int(rebuild),
        )
        if not rebuild:
            return ""
        if self._hot_start:
            # The next solve builds a fresh HiGHS instance and starts cold. cvxpy's compiled
            # problem stays: it maps the parameters to solver data afresh every solve.
            for model in self._models.values():
                model.hot = None
        else:
            # cvxpy builds a new solver every solve; what persists is its problem: drop it, the
            # next solve builds and compiles it afresh (inside its error boundary).
            self._models.clear()
        return f"; solver rebuilt after {streak} failed solves in a row"

    def fallback(
        self,
        inputs: DispatchInputs,
        last_plan: Plan | None,
        reason: str,
        *,
        cause: PlanCause = PlanCause.SOLVER_ERROR,
    ) -> Plan:
        """Rungs 3-5 of the ladder (:func:`essd.ladder.descend`) for valid ``inputs``."""
        return descend(
            now=inputs.time,
            cause=cause,
            reason=reason,
            device_ids=self.device_ids,
            last_plan=last_plan,
            rule_based=lambda: self._fallback(self.batteries, inputs),
            safe_idle=lambda: safe_idle_plan(
                self.device_ids,
                time=inputs.time,
                step_s=inputs.step_s,
                steps=self.steps,
                soc=inputs.soc,
                net_load_w=[ld - pv for ld, pv in zip(inputs.load_w, inputs.pv_w, strict=True)],
            ),
        )

    def _run(self, model: _Model, remaining_s: float) -> tuple[str, float, bool]:
        """One solver run: cvxpy status, seconds in the solver, stopped by the time limit."""
        if self._hot_start:
            if model.hot is None:
                model.hot = _HighsHotStart(model.problem, self._solver_options)
            status = model.hot.solve(remaining_s)
            return status, model.hot.last_solver_s, model.hot.last_model_status == "kTimeLimit"
        opts = dict(self._solver_options)
        if self.solver in ("HIGHS", "CLARABEL"):
            opts.setdefault("time_limit", max(remaining_s, 1e-3))
        model.problem.solve(solver=self.solver, warm_start=True, **opts)
        stats = model.problem.solver_stats
        status = str(model.problem.status)
        # cvxpy reports every solver limit as USER_LIMIT; the time limit is the one set here.
        return status, float(stats.solve_time or 0.0), status == cp.USER_LIMIT

    def _optimize(
        self, inputs: DispatchInputs, a: _Arrays, budget_s: float, started: float
    ) -> Plan:
        model = self._model(inputs.step_s)
        ub_c, ub_d = a.ub_c.copy(), a.ub_d.copy()
        solver_s = 0.0
        solves = 0
        fixed = 0
        overlap = False
        for _ in range(_MAX_DIRECTION_FIXES + 1):
            e_lo, e_hi = model.assign(a, ub_c, ub_d)
            elapsed = time.perf_counter() - started
            if elapsed >= budget_s:
                raise _SolveFailedError(
                    PlanCause.SOLVER_TIMEOUT, f"solver timeout after {elapsed:.2f} s", overrun=True
                )
            given = budget_s - elapsed
            status, s_time, time_limited = self._run(model, given)
            solver_s += s_time
            solves += 1
            if status != cp.OPTIMAL:
                elapsed = time.perf_counter() - started
                if elapsed >= budget_s or (time_limited and s_time >= _OVERRUN_MIN_SHARE * given):
                    raise _SolveFailedError(
                        PlanCause.SOLVER_TIMEOUT,
                        f"solver timeout after {elapsed:.2f} s ({status})",
                        overrun=True,
                    )
                if time_limited:
                    # The limit struck long before the budget was used: the solver's clock
                    # or state is broken, not the budget short.
                    raise _SolveFailedError(
                        PlanCause.SOLVER_STATUS,
                        f"solver stopped at its time limit after {s_time:.3f} s of"
                        f" {given:.2f} s ({status})",
                        overrun=False,
                    )
                raise _SolveFailedError(
                    PlanCause.SOLVER_STATUS,
                    f"solver status {status} after {elapsed:.2f} s",
                    overrun=False,
                )
            c = np.asarray(model.c.value)
            d = np.asarray(model.d.value)
            both = np.minimum(c, d) > _TOL_KW
            overlap = bool(both.any())
            if not overlap:
                break
            fixed += 1
            # Forbid charging where the LP did both: the battery is full there and the LP was
            # burning energy to make room; discharging into the site is the physical way to
            # make room. (Measured against the MILP on such instances: 11-23 % short; keeping
            # the dominant direction instead was 11-29 % short, forbidding discharge 29-52 %.)
            ub_c = np.where(both, 0.0, ub_c)
        if overlap:
            power, e = _simulate(self.batteries, a, d - c, e_lo, e_hi)
        else:
            # One direction per step: publish d - c, held to the live limits exactly (the
            # solver's feasibility tolerance is ~1e-4 W), and the energy that power produces.
            power = np.clip(d - c, -a.ub_c, a.ub_d)
            e = _energy(self.batteries, a, power)
        elapsed = time.perf_counter() - started
        self.last_timing = SolveTiming(elapsed, solver_s, solves)
        if elapsed > budget_s:
            raise _SolveFailedError(
                PlanCause.SOLVER_TIMEOUT, f"solver timeout after {elapsed:.2f} s", overrun=True
            )
        slack = self._slack(model, a)
        rung = FallbackRung.SOFT if slack else FallbackRung.OPTIMAL
        reason = _solved_reason(slack, fixed, overlap)
        return _make_plan(
            self.batteries,
            inputs,
            a,
            power,
            e,
            objective=float(model.problem.value),
            status=str(model.problem.status),
            rung=rung,
            reason=reason,
            cause=PlanCause.SOFT_CONSTRAINTS if slack else PlanCause.OPTIMAL,
            slack=slack,
            solve_s=elapsed,
        )

    def _slack(self, model: _Model, a: _Arrays) -> dict[str, float]:
        """Soft-constraint violations: site limits in W, SoC window in SoC ratio."""
        slack: dict[str, float] = {}
        s_imp = float(np.max(model.s_imp.value))
        s_exp = float(np.max(model.s_exp.value))
        if s_imp > _TOL_KW:
            slack["import_limit_w"] = s_imp * 1000.0
        if s_exp > _TOL_KW:
            slack["export_limit_w"] = s_exp * 1000.0
        for k, b in enumerate(self.batteries):
            cap = b.capacity_wh / 1000.0
            if a.e0[k] < a.lo[k] - 1e-9:
                slack[f"reserve_soc[{b.id}]"] = float((a.lo[k] - a.e0[k]) / cap)
            if a.e0[k] > a.hi[k] + 1e-9:
                slack[f"max_soc[{b.id}]"] = float((a.e0[k] - a.hi[k]) / cap)
        return slack
