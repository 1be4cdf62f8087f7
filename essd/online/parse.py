"""Library responses to essd series: validation and unit conversion, no I/O.

Prices: Nord Pool quotes each delivery period (15 or 60 min) per MWh in the requested
currency; essd plans per kWh: price / 1000, then the site's scale and adder. PV: Forecast.Solar
gives the energy (Wh) of each period ending at a timestamp; essd plans on average power (W)
per step: the energy is spread evenly over its period and each step's share divided by the
step's hours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import numpy as np

from essd.forecast import FloatArray, OnlineSeries

#: Periods (s) a Nord Pool day-ahead series may come in.
PRICE_STEPS_S = (900.0, 1800.0, 3600.0)
#: A PV period averaging more than this times the array's peak power means wrong units.
PV_MAX_RATIO = 1.3


class OnlineDataError(ValueError):
    """A response that cannot be used; the message names the source and the field."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        super().__init__(f"{source}: {field}: {problem}")
        self.source = source
        self.field = field


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _epoch(source: str, field: str, value: object) -> float:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise OnlineDataError(source, field, f"expected a time with a UTC offset, got {value!r}")
    return value.timestamp()


def price_series(
    source: str,
    periods: Iterable[tuple[datetime, datetime, Mapping[str, object]]],
    *,
    area: str,
    now: float,
) -> tuple[float, float, FloatArray]:
    """Nord Pool delivery periods ``(start, end, price per MWh by area)`` as one contiguous
    series of prices per kWh: ``(start, step_s, values)``. OnlineDataError when a period lacks
    ``area`` or a finite price, periods differ in length or leave a gap, or the series ends
    before ``now``. (The currency is checked per delivery day by the source.)"""
    rows: list[tuple[float, float, float]] = []
    for k, (begins, ends, prices) in enumerate(periods):
        t0 = _epoch(source, f"multiAreaEntries.{k}.deliveryStart", begins)
        t1 = _epoch(source, f"multiAreaEntries.{k}.deliveryEnd", ends)
        price = prices.get(area)
        if not _finite(price):
            raise OnlineDataError(
                source,
                f"multiAreaEntries.{k}.entryPerArea.{area}",
                f"expected a finite price per MWh, got {price!r}",
            )
        assert isinstance(price, int | float)
        rows.append((t0, t1, float(price)))
    if not rows:
        raise OnlineDataError(source, "multiAreaEntries", "no delivery periods")
    rows.sort()
    step = rows[0][1] - rows[0][0]
    if step not in PRICE_STEPS_S:
        raise OnlineDataError(
            source, "multiAreaEntries.0", f"a period of {step:g} s (expected 15, 30 or 60 min)"
        )
    for k, (t0, t1, _) in enumerate(rows):
        if t1 - t0 != step:
            raise OnlineDataError(
                source, f"multiAreaEntries.{k}", f"a period of {t1 - t0:g} s among {step:g} s ones"
            )
        if k and t0 != rows[k - 1][1]:
            after = datetime.fromtimestamp(rows[k - 1][1], tz=UTC).isoformat()
            raise OnlineDataError(
                source, f"multiAreaEntries.{k}.deliveryStart", f"a gap or overlap after {after}"
            )
    end = rows[-1][1]
    if end <= now:
        raise OnlineDataError(source, "multiAreaEntries", "stale: every period is in the past")
    values = np.array([p for _, _, p in rows], dtype=np.float64) / 1000.0
    return rows[0][0], step, values


def pv_series(
    source: str,
    wh_period: Mapping[datetime, object],
    *,
    kwp: float,
    step_s: float,
    now: float,
) -> tuple[float, float, FloatArray]:
    """Forecast.Solar's ``watt_hours_period`` (Wh of the period ending at each time) as
    average power (W) per ``step_s`` step, aligned to the clock: ``(start, step_s, values)``;
    the first time only starts the series (the period it ends began before the response).
    OnlineDataError when a value is not a finite number >= 0, times do not increase, a period
    averages more than 1.3 x the array's peak power (wrong units), or it ends before ``now``."""
    field = "result.watt_hours_period"
    points: list[tuple[float, float]] = []
    for when, wh in wh_period.items():
        t = _epoch(source, field, when)
        if not _finite(wh):
            raise OnlineDataError(source, f"{field}.{when.isoformat()}", f"expected Wh, got {wh!r}")
        assert isinstance(wh, int | float)
        if wh < 0:
            raise OnlineDataError(source, f"{field}.{when.isoformat()}", f"negative: {wh:g} Wh")
        if points and t <= points[-1][0]:
            raise OnlineDataError(source, f"{field}.{when.isoformat()}", "times must increase")
        # The first time starts the series: the period it ends began before the response.
        energy = float(wh) if points else 0.0
        hours = (t - points[-1][0]) / 3600.0 if points else 0.0
        # One Wh of slack: the API rounds to whole Wh, and a sunrise period can be seconds.
        if energy > PV_MAX_RATIO * kwp * 1000.0 * hours + 1.0:
            raise OnlineDataError(
                source,
                f"{field}.{when.isoformat()}",
                f"{energy / hours:.0f} W on average is beyond {PV_MAX_RATIO:g} x the array's "
                f"{kwp:g} kWp (wrong units?)",
            )
        points.append((t, energy))
    if len(points) < 2:
        raise OnlineDataError(source, field, "fewer than two times")
    if points[-1][0] <= now:
        raise OnlineDataError(source, field, "stale: every period is in the past")
    times = np.array([t for t, _ in points])
    cumulative = np.cumsum([wh for _, wh in points])  # Wh up to each time, linear between
    start = math.floor(times[0] / step_s) * step_s
    end = math.ceil(times[-1] / step_s) * step_s
    edges = np.arange(start, end + step_s / 2, step_s)
    per_step = np.diff(np.interp(edges, times, cumulative))  # Wh per step
    return start, step_s, per_step / (step_s / 3600.0)


def online_series(
    source: str, start: float, step_s: float, values: FloatArray, *, now: float, max_age_s: float
) -> OnlineSeries:
    """The control layer's value for a parsed series fetched at ``now``."""
    return OnlineSeries(
        source=source,
        start=start,
        step_s=step_s,
        values=values,
        fetched_at=now,
        expires_at=now + max_age_s,
    )
