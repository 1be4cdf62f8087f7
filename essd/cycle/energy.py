"""The site's energy flows from one cycle's readings: measured PV, net load and what the
batteries saved. Pure functions: the cycle puts their results in its record.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
The meter sees grid = load - PV - battery, so the load net of unmeasured PV is
grid + battery + measured PV.
"""

from __future__ import annotations

import math

from essd.cycle.forecasting import measured_pv
from essd.domain import Snapshot
from essd.events import ForecastRecord
from essd.forecast import Forecast


def battery_power_w(snapshot: Snapshot) -> float:
    """Sum of the valid measured battery powers, W (> 0 discharges)."""
    return float(
        sum(
            r.power_w.value
            for r in snapshot.batteries.values()
            if r.power_w.valid and r.power_w.value is not None
        )
    )


def net_load_w(snapshot: Snapshot, grid_w: float | None) -> float | None:
    """The site's consumption less unmeasured PV, W; None without a valid grid reading."""
    if grid_w is None or not math.isfinite(grid_w):
        return None
    return grid_w + battery_power_w(snapshot) + (measured_pv(snapshot) or 0.0)


def step_cost(
    grid_w: float,
    dt_s: float,
    *,
    import_price: float,
    export_price: float,
    carbon_g_per_kwh: float,
    carbon_price_per_kg: float,
) -> float:
    """What ``grid_w`` held for ``dt_s`` costs: energy at the prices plus the carbon price of
    imports (tariff currency; negative when export earns more)."""
    kwh_in = max(0.0, grid_w) * dt_s / 3.6e6
    kwh_out = max(0.0, -grid_w) * dt_s / 3.6e6
    co2_kg = kwh_in * carbon_g_per_kwh / 1000.0
    return kwh_in * import_price - kwh_out * export_price + co2_kg * carbon_price_per_kg


def forecast_record(forecast: Forecast, steps: int) -> ForecastRecord:
    """The first ``steps`` of ``forecast`` as the cycle's record keeps it."""
    return ForecastRecord(
        start=forecast.start,
        step_s=forecast.step_s,
        load_w=tuple(float(v) for v in forecast.load_w[:steps]),
        pv_w=tuple(float(v) for v in forecast.pv_w[:steps]),
        carbon_g_per_kwh=tuple(float(v) for v in forecast.carbon_g_per_kwh[:steps]),
    )
