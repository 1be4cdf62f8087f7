"""The site's energy at scrape time: power flows, the energy counters behind today's and this
month's figures, savings, the billing peak, alarms and the plan and forecast ahead.

Everything is read from the last :class:`~essd.events.CycleCompleted` (its durable totals and
the record of the cycle), like :mod:`essd.metrics.live`. The plan ahead is exported in whole
hours (``hours_ahead`` "00".."23", the mean of the plan's steps in that hour), a fixed set of
label values, so a dashboard can draw the next day as bars from one instant query.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from essd.events import CycleCompleted
from essd.metrics.labels import JOULES_PER_WH
from essd.metrics.live import ExporterState, finite

#: Hours of the plan exported ahead (the default horizon is one day).
PLAN_AHEAD_HOURS = 24


class _StateSource(Protocol):
    @property
    def state(self) -> ExporterState:
        """The latest state, replaced whole on every event."""
        ...


def hourly_means(values: Sequence[float], step_s: float, hours: int) -> list[float]:
    """The mean of ``values`` (one per ``step_s`` step) over each whole hour, for at most
    ``hours`` hours and only hours the series covers completely."""
    if step_s <= 0:
        return []
    per_hour = max(1, round(3600 / step_s))
    out = []
    for h in range(hours):
        chunk = values[h * per_hour : (h + 1) * per_hour]
        if len(chunk) < per_hour:
            break
        out.append(sum(chunk) / len(chunk))
    return out


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
    if value is None or not finite(value):
        return None
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=max(0.0, value))


def _ahead(name: str, doc: str, values: Sequence[float]) -> GaugeMetricFamily | None:
    if not values:
        return None
    fam = GaugeMetricFamily(name, doc, labels=["hours_ahead"])
    for h, v in enumerate(values):
        if finite(v):
            fam.add_metric([f"{h:02d}"], v)
    return fam


class EnergyCollector(Collector):
    """Renders the energy families from the exporter's latest cycle."""

    def __init__(self, exporter: _StateSource) -> None:
        self._x = exporter

    def collect(self) -> Iterable[Metric]:
        """Families for the latest cycle; empty before the first."""
        ev = self._x.state.cycle
        if ev is None:
            return []
        return [m for m in (*_flows(ev), *_totals(ev), *_ahead_families(ev)) if m is not None]


def _flows(ev: CycleCompleted) -> list[Metric | None]:
    batteries = ev.snapshot.batteries.values()
    alarms = GaugeMetricFamily(
        "essd_device_alarms",
        "Alarms the device reports this cycle (0 when none; names in the MQTT device state).",
        labels=["device"],
    )
    for b in batteries:
        alarms.add_metric([b.device_id], float(len(b.alarms)))
    return [
        _gauge(
            "essd_site_pv_power_watts",
            "PV power measured by the units themselves (absent where none measures it).",
            ev.pv_power_w,
        ),
        _gauge(
            "essd_site_net_load_watts",
            "Site consumption less unmeasured PV: grid + battery + measured PV.",
            ev.net_load_w,
        ),
        _gauge(
            "essd_billing_peak_import_watts",
            "The billing period's running peak of the per-step mean grid import (the demand "
            "charge is billed on it).",
            ev.billing_peak_w,
        ),
        alarms,
        _chargers(ev),
        *_swap(ev),
    ]


def _swap(ev: CycleCompleted) -> list[Metric | None]:
    """A swap station's packs ready vs its service level (absent on other sites)."""
    s = ev.swap
    if s is None:
        return []
    return [
        _gauge(
            "essd_swap_packs_ready",
            "Charged packs (SoC >= target) in the swap station's slots now.",
            float(s.packs_ready),
        ),
        _gauge(
            "essd_swap_service_level",
            "Charged packs the swap station must keep ready (k).",
            float(s.service_level),
        ),
        _gauge(
            "essd_swap_demand_per_hour",
            "Swaps expected in the current hour (learned or from the series).",
            s.demand_per_hour,
        ),
        _counter(
            "essd_swap_events", "Swaps seen from the slots' readings since start.", s.swaps_total
        ),
    ]


def _chargers(ev: CycleCompleted) -> Metric | None:
    """The limit sent to each EV charger this cycle (absent on sites without chargers)."""
    if not ev.charger_limits_w:
        return None
    fam = GaugeMetricFamily(
        "essd_charger_limit_watts",
        "Power limit essd sent the EV charger this cycle (0 pauses it).",
        labels=["charger"],
    )
    for charger, w in sorted(ev.charger_limits_w.items()):
        if finite(w):
            fam.add_metric([charger], w)
    return fam


def _totals(ev: CycleCompleted) -> list[Metric | None]:
    t = ev.totals
    return [
        _counter(
            "essd_site_battery_charged_energy_joules_total",
            "AC energy into the batteries since the durable state began.",
            t.battery_charged_wh * JOULES_PER_WH,
        ),
        _counter(
            "essd_site_battery_discharged_energy_joules_total",
            "AC energy out of the batteries since the durable state began.",
            t.battery_discharged_wh * JOULES_PER_WH,
        ),
        _counter(
            "essd_site_pv_energy_joules_total",
            "PV energy the units measured since the durable state began (0 where none does).",
            t.pv_wh * JOULES_PER_WH,
        ),
        _gauge(
            "essd_site_savings",
            "What the batteries saved since start, tariff currency: the cost with every battery "
            "idle minus the cost paid (demand charge excluded); negative while they cost more.",
            t.savings,
        ),
    ]


def _ahead_families(ev: CycleCompleted) -> list[Metric | None]:
    plan = ev.plan
    hours = PLAN_AHEAD_HOURS
    battery = [sum(p[k] for p in plan.power_w.values() if k < len(p)) for k in range(plan.steps)]
    out: list[Metric | None] = [
        _ahead(
            "essd_plan_ahead_battery_power_watts",
            "Planned battery power, all units, mean of each hour ahead (> 0 discharges).",
            hourly_means(battery, plan.step_s, hours),
        ),
        _ahead(
            "essd_plan_ahead_grid_power_watts",
            "Planned grid power, mean of each hour ahead (> 0 imports).",
            hourly_means(plan.grid_w, plan.step_s, hours),
        ),
        _ahead(
            "essd_plan_ahead_import_price_per_kwh",
            "Import price the plan used, mean of each hour ahead, tariff currency per kWh.",
            hourly_means(plan.import_price, plan.step_s, hours),
        ),
    ]
    fc = ev.forecast
    if fc is not None:
        out += [
            _ahead(
                "essd_forecast_ahead_net_load_watts",
                "Forecast load the plan saw (net of unmeasured PV), mean of each hour ahead.",
                hourly_means(fc.load_w, fc.step_s, hours),
            ),
            _ahead(
                "essd_forecast_ahead_pv_watts",
                "Forecast PV, mean of each hour ahead.",
                hourly_means(fc.pv_w, fc.step_s, hours),
            ),
        ]
        if fc.pv_w:
            out.append(
                _gauge(
                    "essd_forecast_pv_watts", "Forecast PV power for the current step.", fc.pv_w[0]
                )
            )
    return out
