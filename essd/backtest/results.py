"""The figures of a backtest for its scored window, in total and per local day
(definitions in :mod:`essd.backtest.score` and docs/backtest.md).

Battery W > 0 discharges; grid W > 0 imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from essd.backtest.runner import Replay
from essd.backtest.score import Prices, Span, optimum, span_cost

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class SpanResult:
    """The figures of one scored span (the window, or one day of it)."""

    start: str
    end: str
    cost: float
    baseline_cost: float
    optimal_cost: float
    optimal_cost_to_end_soc: float
    savings: float
    optimal_savings: float
    savings_share: float | None
    uncorrected_savings: float
    soc_start: float
    soc_end: float
    billed_peak_w: float
    baseline_billed_peak_w: float
    optimal_billed_peak_w: float
    carbon_kg: float
    baseline_carbon_kg: float
    throughput_kwh: float
    curtailed_kwh: float
    rungs: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON object."""
        return {f: getattr(self, f) for f in self.__slots__}


def _weighted(replay: Replay, k: int) -> float:
    """Capacity-weighted SoC over all units at step boundary ``k``."""
    caps = {u.spec.id: u.spec.capacity_wh for u in replay.units}
    total = sum(caps.values())
    return float(sum(replay.soc[i][k] * c for i, c in caps.items()) / total)


def _span(replay: Replay, i0: int, i1: int) -> Span:
    p = replay.prices
    h = replay.history
    return Span(
        times=h.times[i0:i1],
        step_s=h.step_s,
        load_w=h.columns["load_w"][i0:i1],
        pv_w=h.columns["pv_w"][i0:i1],
        prices=Prices(
            import_price=p.import_price[i0:i1],
            export_price=p.export_price[i0:i1],
            carbon_g_per_kwh=p.carbon_g_per_kwh[i0:i1],
            carbon_price_per_kg=p.carbon_price_per_kg,
            demand_charge_per_kw=p.demand_charge_per_kw,
            billing_window_s=p.billing_window_s,
        ),
        tz=ZoneInfo(replay.settings.site.timezone),
    )


def _iso(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz=tz).isoformat()


def score_span(replay: Replay, i0: int, i1: int) -> SpanResult:
    """Score history steps ``i0 .. i1-1`` (see :mod:`essd.backtest.score`)."""
    span = _span(replay, i0, i1)
    site = replay.settings.site
    cost, co2, peaks = span_cost(span, replay.grid_w[i0:i1])
    base, base_co2, base_peaks = span_cost(span, replay.baseline_w[i0:i1])
    start = {i: float(s[i0]) for i, s in replay.soc.items()}
    end = {i: float(s[i1]) for i, s in replay.soc.items()}
    limits = {
        "import_limit_w": site.grid_import_limit_w,
        "export_limit_w": site.grid_export_limit_w,
    }
    opt0, opt_grid, _ = optimum(span, replay.units, start, start, **limits)
    opt_end, _, _ = optimum(span, replay.units, start, end, **limits)
    savings = base - cost + opt_end - opt0
    optimal = base - opt0
    _, _, opt_peaks = span_cost(span, opt_grid)
    h = span.step_s / 3600.0
    throughput = sum(float(np.sum(np.abs(p[i0:i1]))) for p in replay.power_w.values()) * h / 1e3
    return SpanResult(
        start=_iso(float(span.times[0]), span.tz),
        end=_iso(float(span.times[-1]) + span.step_s, span.tz),
        cost=cost,
        baseline_cost=base,
        optimal_cost=opt0,
        optimal_cost_to_end_soc=opt_end,
        savings=savings,
        optimal_savings=optimal,
        savings_share=savings / optimal if optimal > 1e-6 else None,
        uncorrected_savings=base - cost,
        soc_start=_weighted(replay, i0),
        soc_end=_weighted(replay, i1),
        billed_peak_w=max(peaks.values(), default=0.0),
        baseline_billed_peak_w=max(base_peaks.values(), default=0.0),
        optimal_billed_peak_w=max(opt_peaks.values(), default=0.0),
        carbon_kg=co2,
        baseline_carbon_kg=base_co2,
        throughput_kwh=throughput,
        curtailed_kwh=float(np.sum(replay.curtailed_w[i0:i1])) * h / 1e3,
        rungs=replay.rungs_in(i0, i1),
    )


def day_bounds(replay: Replay, i0: int, i1: int) -> list[tuple[int, int]]:
    """Step ranges of the local days within ``i0 .. i1-1``."""
    tz = ZoneInfo(replay.settings.site.timezone)
    days = [datetime.fromtimestamp(t, tz=tz).date() for t in replay.history.times[i0:i1]]
    bounds: list[tuple[int, int]] = []
    start = i0
    for k in range(1, len(days)):
        if days[k] != days[k - 1]:
            bounds.append((start, i0 + k))
            start = i0 + k
    bounds.append((start, i1))
    return bounds


def score_replay(replay: Replay, i0: int, i1: int) -> dict[str, Any]:
    """The ``--json`` object: the window's figures, the cycles per rung, and ``days``."""
    total = score_span(replay, i0, i1)
    out = total.to_json()
    out["days"] = [score_span(replay, a, b).to_json() for a, b in day_bounds(replay, i0, i1)]
    out["wall_s"] = replay.wall_s
    return out
