"""How a backtest is scored: one cost definition for the realized run, the no-battery
baseline and the perfect-foresight optimum, and the optimum itself.

    cost = sum over steps (import kWh x import price - export kWh x export price)
         + carbon price x kg CO2 (import kWh x grid intensity)
         + demand charge per kW x billed peak

The billed peak is the highest average import over a billing window (15 min unless
configured) within each calendar month of the scored span, one charge per month. A span is
scored on its own: a day is billed as if it were its own billing period.

Savings are corrected for the change in stored energy. ``optimum(s)`` is the least cost with
perfect knowledge of the span, starting from the run's SoC at the start of the span and ending
with at least SoC ``s``. The run ended at ``s_run``; had it ended where it started (``s0``), it
would have cost ``cost - (optimum(s_run) - optimum(s0))`` by the optimum's own value of
energy. So

    savings       = baseline - cost + optimum(s_run) - optimum(s0)
    savings_share = savings / (baseline - optimum(s0))

A run that empties its battery gains nothing by it (``optimum(s_run)`` is lower by what the
emptied energy was worth), and the share cannot exceed 1. Units: W, kWh, prices per kWh.
Battery W > 0 discharges; grid W > 0 imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs
from essd.domain import LiveLimits

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Prices:
    """Per-step prices of a span: import/export per kWh, grid intensity g/kWh, and the tariff
    terms that are not per step."""

    import_price: FloatArray
    export_price: FloatArray
    carbon_g_per_kwh: FloatArray
    carbon_price_per_kg: float
    demand_charge_per_kw: float
    billing_window_s: float


@dataclass(frozen=True, slots=True)
class Span:
    """A scored stretch of the history: step start times, step length and site data."""

    times: FloatArray
    step_s: float
    load_w: FloatArray
    pv_w: FloatArray
    prices: Prices
    tz: ZoneInfo


@dataclass(frozen=True, slots=True)
class UnitLimits:
    """What the optimum knows of one unit: its spec, power ratings and SoC window."""

    spec: BatterySpec
    max_charge_w: float
    max_discharge_w: float
    reserve_soc: float
    max_soc: float


def billed_peak_w(span: Span, grid_w: FloatArray) -> dict[str, float]:
    """Per calendar month (``YYYY-MM``) of the span: the highest average import, W, over the
    billing windows (aligned to the clock) that the span covers."""
    window = span.prices.billing_window_s
    imp = np.maximum(grid_w, 0.0)
    peaks: dict[str, float] = {}
    sums: dict[tuple[str, float], tuple[float, float]] = {}
    for t, g in zip(span.times.tolist(), imp.tolist(), strict=True):
        month = datetime.fromtimestamp(t, tz=span.tz).strftime("%Y-%m")
        key = (month, t - (t % window))
        wh, s = sums.get(key, (0.0, 0.0))
        sums[key] = (wh + g * span.step_s, s + span.step_s)
    for (month, _), (wsum, covered) in sums.items():
        avg = wsum / covered
        peaks[month] = max(peaks.get(month, 0.0), avg)
    return peaks


def span_cost(span: Span, grid_w: FloatArray) -> tuple[float, float, dict[str, float]]:
    """(cost, kg CO2, billed peak per month) of a grid series over ``span``."""
    h = span.step_s / 3600.0
    p = span.prices
    kwh_in = np.maximum(grid_w, 0.0) * h / 1000.0
    kwh_out = np.maximum(-grid_w, 0.0) * h / 1000.0
    co2 = float(np.sum(kwh_in * p.carbon_g_per_kwh)) / 1000.0
    peaks = billed_peak_w(span, grid_w)
    cost = (
        float(np.sum(kwh_in * p.import_price - kwh_out * p.export_price))
        + co2 * p.carbon_price_per_kg
        + p.demand_charge_per_kw * sum(peaks.values()) / 1000.0
    )
    return cost, co2, peaks


def optimum(
    span: Span,
    units: Sequence[UnitLimits],
    soc_start: Mapping[str, float],
    soc_end: Mapping[str, float],
    *,
    import_limit_w: float,
    export_limit_w: float,
) -> tuple[float, FloatArray, dict[str, FloatArray]]:
    """The least-cost dispatch knowing the span's true series, from ``soc_start`` to at least
    ``soc_end``: (cost by :func:`span_cost`, grid W, battery W per unit).

    The optimizer's own LP over the whole span (no change penalty); export beyond the export
    limit is curtailed PV, as in the replay. RuntimeError when the LP finds no plan.
    """
    steps = len(span.times)
    specs = [u.spec for u in units]
    dispatcher = Dispatcher(
        specs,
        steps,
        solver="HIGHS",
        step_s=span.step_s,
        change_cost_per_kw=0.0,
        terminal_shortfall_cost_per_kwh=100.0,
    )
    p = span.prices
    ids = [u.spec.id for u in units]
    reserve = {u.spec.id: min(u.reserve_soc, soc_start[u.spec.id]) for u in units}
    top = {u.spec.id: max(u.max_soc, soc_start[u.spec.id]) for u in units}
    inputs = DispatchInputs(
        time=float(span.times[0]),
        step_s=span.step_s,
        soc={i: soc_start[i] for i in ids},
        limits={u.spec.id: LiveLimits(u.max_charge_w, u.max_discharge_w) for u in units},
        reserve_soc=reserve,
        max_soc=top,
        load_w=span.load_w.tolist(),
        pv_w=span.pv_w.tolist(),
        import_price=p.import_price.tolist(),
        export_price=p.export_price.tolist(),
        carbon_intensity=(p.carbon_g_per_kwh / 1000.0).tolist(),
        carbon_price_per_kg=p.carbon_price_per_kg,
        demand_charge_per_kw=p.demand_charge_per_kw,
        import_limit_w=import_limit_w,
        export_limit_w=math.inf,
        terminal_soc={i: min(max(soc_end[i], reserve[i]), top[i]) for i in ids},
    )
    plan = dispatcher.solve(inputs, budget_s=600.0, last_plan=None)
    if plan.rung > 2:
        raise RuntimeError(f"perfect-foresight optimum failed: {plan.reason}")
    power = {i: np.asarray(plan.power_w[i][:steps], dtype=np.float64) for i in ids}
    battery = np.sum(list(power.values()), axis=0)
    grid = np.maximum(span.load_w - span.pv_w - battery, -export_limit_w)
    cost, _, _ = span_cost(span, grid)
    return cost, grid, power
