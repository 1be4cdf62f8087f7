"""What the dispatch optimizer is given: the batteries (BatterySpec) and the per-cycle inputs
(DispatchInputs), validated on the event loop before a solver thread sees them, and turned into
the arrays the LP and the planners use (kW, kWh, per kWh).

Sign conventions: battery power W > 0 discharges into the site, < 0 charges; grid power W > 0
imports. SoC is a ratio 0..1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from essd.domain import LiveLimits, Plan

if TYPE_CHECKING:
    from essd.dispatch.sessions import FlexSession


FloatArray = npt.NDArray[np.float64]


BoolArray = npt.NDArray[np.bool_]


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
    - ``peak_margin_w``: per step, how far above the forecast the import may come in (W >= 0);
      the demand charge is planned against import + margin (headroom for forecast error).
    - ``billed_import_wh`` / ``billed_elapsed_s``: what the meter measured of the current
      clock-aligned billing window (one step long) so far: the energy imported and the time
      it covers (< ``step_s``). The first step's demand-charge threshold then holds the
      window's average, not the step from now (:func:`first_step_peak_kw`); 0 / 0 (the
      default, and a cycle at a window's start) plans the first step as a whole window.
      ``billed_peak_w``: the level that window is held to once part of it is measured (W,
      >= ``peak_import_w``; None: ``peak_import_w``).
    - ``pv_curtailable``: the PV inverters can curtail (an export limiter, a power limit):
      the plan may curtail up to ``pv_w`` per step.
    - ``sessions``: flexible loads with a deadline (EV sessions, swap packs), see
      :mod:`essd.dispatch.sessions`; at most the Dispatcher's flexible-load columns (``FlexSpec``).
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
    pv_curtailable: bool = False
    peak_margin_w: Sequence[float] | None = None
    sessions: Sequence[FlexSession] = ()
    billed_import_wh: float = 0.0
    billed_elapsed_s: float = 0.0
    billed_peak_w: float | None = None


@dataclass(frozen=True, slots=True)
class DispatchArrays:
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
    peak_first_kw: float  # the first step's threshold (first_step_peak_kw)
    imp_lim: float  # kW
    exp_lim: float  # kW
    prev_kw: FloatArray  # (B,) battery sign
    target_e: FloatArray  # (B,) kWh, 0 where none
    terminal_value: float
    curt_ub: FloatArray  # (T,) kW of PV that may be curtailed
    peak_margin: FloatArray  # (T,) kW, import headroom planned for the demand charge


def ahead_inputs(inputs: DispatchInputs, plan: Plan) -> DispatchInputs | None:
    """The inputs of the horizon that starts at the step after ``inputs.time``, as far as
    this cycle knows them: every per-step series one step on (its last value held), the SoC
    the ``plan`` expects at that step's start and its first step as the previous setpoint.
    For :meth:`essd.dispatch.Dispatcher.prepare`; None where that guess is not made
    (flexible-load sessions, a plan of other units or steps).
    """
    step = inputs.step_s
    if inputs.sessions or plan.step_s != step or not plan.steps:
        return None
    if any(d not in plan.soc or len(plan.soc[d]) < 2 for d in inputs.soc):
        return None

    def on(seq: Sequence[Any]) -> list[Any]:
        return [*seq[1:], seq[-1]] if len(seq) else list(seq)

    return replace(
        inputs,
        time=(math.floor(inputs.time / step) + 1) * step,
        soc={d: plan.soc[d][1] for d in inputs.soc},
        load_w=on(inputs.load_w),
        pv_w=on(inputs.pv_w),
        import_price=on(inputs.import_price),
        export_price=on(inputs.export_price),
        availability={d: on(v) for d, v in inputs.availability.items()},
        carbon_intensity=None if inputs.carbon_intensity is None else on(inputs.carbon_intensity),
        peak_margin_w=None if inputs.peak_margin_w is None else on(inputs.peak_margin_w),
        previous_setpoint_w={d: plan.first_step_w(d) for d in inputs.soc if d in plan.power_w},
        billed_import_wh=0.0,
        billed_elapsed_s=0.0,
        billed_peak_w=None,
    )


def check_finite(name: str, v: float, *, lo: float | None = None, allow_inf: bool = False) -> None:
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
    # One conversion instead of an isinstance per step (measured: 16 ms of a 99-unit cycle):
    # a sequence of bools (Python or numpy) and nothing else converts to a bool array.
    arr = np.asarray(raw)
    if arr.dtype != np.bool_ or arr.shape != (steps,):
        raise InvalidDispatchInputsError(name, "must be booleans")
    return arr


def checked_arrays(
    known: tuple[DispatchInputs, DispatchArrays] | None,
    batteries: Sequence[BatterySpec],
    steps: int,
    inputs: DispatchInputs,
) -> DispatchArrays:
    """The arrays ``known`` holds when they are of these very ``inputs`` (checked already),
    else :func:`validate_inputs`."""
    if known is not None and known[0] is inputs:
        return known[1]
    return validate_inputs(batteries, steps, inputs)


def validate_inputs(
    batteries: Sequence[BatterySpec], steps: int, inputs: DispatchInputs
) -> DispatchArrays:
    """Check ``inputs`` against the topology and convert them to kW/kWh arrays.

    Raises InvalidDispatchInputsError (a ValueError) naming the first offending field.
    """
    ids = [b.id for b in batteries]
    check_finite("time", inputs.time)
    check_finite("step_s", inputs.step_s)
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
        check_finite(f"previous_setpoint_w[{b.id}]", v)
        prev[k] = v / 1000.0
    # Net consumption: negative where unmeasured PV exports (DispatchInputs docstring).
    load = _series("load_w", inputs.load_w, steps)
    pv = _series("pv_w", inputs.pv_w, steps, lo=0.0)
    p_imp = _series("import_price", inputs.import_price, steps)
    p_exp = _series("export_price", inputs.export_price, steps)
    carbon = _series("carbon_intensity", inputs.carbon_intensity, steps, lo=0.0)
    check_finite("carbon_price_per_kg", inputs.carbon_price_per_kg, lo=0.0)
    check_finite("demand_charge_per_kw", inputs.demand_charge_per_kw, lo=0.0)
    check_finite("peak_import_w", inputs.peak_import_w, lo=0.0)
    check_finite("import_limit_w", inputs.import_limit_w, lo=0.0, allow_inf=True)
    check_finite("export_limit_w", inputs.export_limit_w, lo=0.0, allow_inf=True)
    check_finite("terminal_value_per_kwh", inputs.terminal_value_per_kwh, lo=0.0)
    price_imp = p_imp + inputs.carbon_price_per_kg * carbon
    # The grid can never carry more than this, so "no limit" becomes this (not inf, not 1e9:
    # a huge right-hand side ruins the scaling of interior-point solvers).
    reach = float(np.max(np.abs(load - pv))) / 1000.0
    reach = 2.0 * (reach + float(ub_c.sum(0).max() + ub_d.sum(0).max())) + 1.0
    return DispatchArrays(
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
        peak_first_kw=_first_step_peak(inputs, h, reach),
        imp_lim=min(inputs.import_limit_w / 1000.0, reach),
        exp_lim=min(inputs.export_limit_w / 1000.0, reach),
        prev_kw=prev,
        target_e=target * cap,
        terminal_value=float(inputs.terminal_value_per_kwh),
        curt_ub=pv / 1000.0 if inputs.pv_curtailable else np.zeros(steps),
        peak_margin=_series("peak_margin_w", inputs.peak_margin_w, steps, lo=0.0) / 1000.0,
    )


def _first_step_peak(inputs: DispatchInputs, h: float, reach: float) -> float:
    """The billed-window inputs, checked, as the first step's threshold (kW)."""
    check_finite("billed_import_wh", inputs.billed_import_wh, lo=0.0)
    check_finite("billed_elapsed_s", inputs.billed_elapsed_s, lo=0.0)
    if inputs.billed_elapsed_s >= inputs.step_s:
        raise InvalidDispatchInputsError(
            "billed_elapsed_s",
            f"must be below step_s ({inputs.step_s!r}), got {inputs.billed_elapsed_s!r}",
        )
    window_w = inputs.peak_import_w if inputs.billed_peak_w is None else inputs.billed_peak_w
    check_finite("billed_peak_w", window_w, lo=inputs.peak_import_w)
    if inputs.billed_elapsed_s == 0:
        window_w = inputs.peak_import_w
    return first_step_peak_kw(
        window_w / 1000.0,
        inputs.billed_import_wh / 1000.0,
        inputs.billed_elapsed_s / inputs.step_s,
        h,
        reach,
        threshold_kw=inputs.peak_import_w / 1000.0,
    )


# The first step is planned on the billing window under way while at least this share of the
# window is ahead. The LP's first step is a whole step from now: with less of it in the current
# window it lies mostly in the next one, whose billed import starts from nothing, and 1 / r
# grows past what the plan can mean (measured: thresholds of -389 and +565 kW in a window's last
# 30 s, and 20-40 ms HiGHS solves of a 4 x 96 LP that takes 0.6 ms).
_MIN_REST_SHARE = 1.0 / 3.0


def first_step_peak_kw(
    peak_kw: float,
    so_far_kwh: float,
    elapsed: float,
    h: float,
    reach_kw: float,
    *,
    threshold_kw: float | None = None,
) -> float:
    """The demand-charge threshold of the LP's first step (kW), given what the meter already
    measured of the current clock-aligned billing window (one step of ``h`` hours).

    The LP states the demand charge per step t as ``pk >= g[t] + m[t] - P[t]`` (``pk`` the
    new peak above the running threshold ``P = threshold_kw``, ``g`` the planned import,
    ``m`` the margin), with ``P[t] = P`` for every step but the first. The first step starts
    now, a share ``f = elapsed`` (0 <= f < 1) into the window, which has imported
    ``Q = so_far_kwh``; ``r = 1 - f`` is still ahead. The plan holds ``g[0]`` for the rest,
    so the window's average import is

        A = Q / h + r * (g[0] + m[0])

    and it is billed within the plan's peak when ``A <= P + pk``, i.e.

        g[0] + m[0] - pk / r <= (P - Q / h) / r.

    ``1 / r`` on ``pk`` would put a parameter in the LP's matrix (the fast path,
    essd.dispatch.lpmaps, allows them only in costs, bounds and right-hand sides), so ``pk / r``
    is taken as ``pk + E (1 / r - 1)`` with ``E = W - P`` the new peak the plan is expected to
    set anyway (``W = peak_kw``, the window's level, >= ``P``: the last plan's highest later
    import): exact when ``pk = E``, stricter when ``pk > E``. The row becomes

        g[0] + m[0] - pk <= (W - Q / h) / r - (W - P) =: P[0],

    the threshold returned: a right-hand side only. An excess beyond it is charged 1 / r
    times, as the LP counts the first step's energy for a whole step, 1 / r times what the
    rest of the window takes, so "kW of discharge against kW of billed peak" keeps its true
    ratio. At a window's start (f = 0, Q = 0) ``P[0] = P``: nothing changes. Without
    ``threshold_kw``, ``P = W``. With less than ``_MIN_REST_SHARE`` of the window ahead the
    first step is planned on ``P`` as every other step; the result is clipped to +-``reach_kw``
    (the most the grid can carry: beyond it a threshold cannot bind).
    """
    threshold = peak_kw if threshold_kw is None else threshold_kw
    rest = 1.0 - elapsed
    if rest < _MIN_REST_SHARE - 1e-9:
        return min(max(threshold, -reach_kw), reach_kw)
    expected = max(0.0, peak_kw - threshold)
    return min(max((peak_kw - so_far_kwh / h) / rest - expected, -reach_kw), reach_kw)


def energy_window(
    batteries: Sequence[BatterySpec], a: DispatchArrays, ub_c: FloatArray, ub_d: FloatArray
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


def terminal_value(
    import_price: FloatArray,
    export_price: FloatArray,
    net_w: FloatArray,
    step_s: float,
    room_kwh: float,
) -> float:
    """What a kWh left stored at the end of the horizon is worth, per kWh.

    Where the forecast leaves at least ``room_kwh`` (the batteries' usable window) of PV over
    (net load ``net_w`` < 0), storing energy again costs only the export price forgone, at
    most the highest among those steps: energy kept is worth the middle between that and the
    cheapest import price (whether it will be needed before the PV refills the battery is as
    uncertain as the forecast). That is above the export price, so spare PV still fills the
    battery as insurance against a forecast that was too low, and below the import price, so
    energy is not kept overnight that tomorrow's PV would have replaced. Otherwise energy is
    worth the cheapest import price.
    """
    buy = max(0.0, float(np.min(import_price)))
    surplus = net_w < 0
    surplus_kwh = float(np.sum(-net_w[surplus])) * step_s / 3.6e6
    if surplus.any() and surplus_kwh >= room_kwh:
        sell = min(buy, max(0.0, float(np.max(export_price[surplus]))))
        return 0.5 * (sell + buy)
    return buy
