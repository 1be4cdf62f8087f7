"""The site's energy metrics, rendered from the cycle's record: flows, totals, savings, the
billing peak, alarms and the plan ahead in whole hours (a fixed, small set of series)."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from essd.clock import SimClock
from essd.events import EventBus, ForecastRecord
from essd.metrics import MetricsExporter
from essd.metrics.energy import PLAN_AHEAD_HOURS, hourly_means
from tests.support.mqtt import make_cycle


def test_hourly_means_cover_whole_hours_only() -> None:
    assert hourly_means([1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0], 900.0, 24) == [4.0, 12.0]
    assert hourly_means([1.0, 3.0, 5.0], 900.0, 24) == []  # not a whole hour
    assert hourly_means([2.0] * 10, 3600.0, 3) == [2.0, 2.0, 2.0]  # at most `hours`
    assert hourly_means([1.0], 0.0, 3) == []


def samples(exporter: MetricsExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(exporter.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_energy_families_from_one_cycle() -> None:
    ev = make_cycle(5, steps=96, power_w={"bess1": 1500.0, "home2": -500.0})
    b = ev.snapshot.batteries["home2"]
    ev = dataclasses.replace(
        ev,
        snapshot=dataclasses.replace(
            ev.snapshot,
            batteries={**ev.snapshot.batteries, "home2": dataclasses.replace(b, alarms=("bms",))},
        ),
        totals=dataclasses.replace(ev.totals, battery_charged_wh=500.0, pv_wh=250.0, savings=-1.5),
        net_load_w=2200.0,
        billing_peak_w=8000.0,
        charger_limits_w={"wallbox": 3680.0, "cp2:2": 0.0},
        forecast=ForecastRecord(
            ev.time, 900.0, (2000.0,) * 96, tuple(float(k) for k in range(96)), (581.0,) * 96
        ),
    )
    clock = SimClock()
    exporter = MetricsExporter(clock=clock, process_metrics=False)
    bus = EventBus()
    exporter.attach(bus)
    bus.publish(ev)
    got = samples(exporter)
    assert got[("essd_site_net_load_watts", ())] == 2200.0
    assert ("essd_site_pv_power_watts", ()) not in got  # no unit measures PV
    assert got[("essd_site_battery_charged_energy_joules_total", ())] == 500.0 * 3600.0
    assert got[("essd_site_pv_energy_joules_total", ())] == 250.0 * 3600.0
    assert got[("essd_site_savings", ())] == -1.5
    assert got[("essd_billing_peak_import_watts", ())] == 8000.0
    assert got[("essd_charger_limit_watts", (("charger", "wallbox"),))] == 3680.0
    assert got[("essd_charger_limit_watts", (("charger", "cp2:2"),))] == 0.0
    assert got[("essd_device_alarms", (("device", "home2"),))] == 1.0
    assert got[("essd_device_alarms", (("device", "bess1"),))] == 0.0
    ahead = {
        dict(labels)["hours_ahead"]: v
        for (name, labels), v in got.items()
        if name == "essd_plan_ahead_battery_power_watts"
    }
    assert sorted(ahead) == [f"{h:02d}" for h in range(PLAN_AHEAD_HOURS)]
    assert set(ahead.values()) == {1000.0}  # 1500 - 500 W in every hour
    pv = {
        dict(labels)["hours_ahead"]: v
        for (name, labels), v in got.items()
        if name == "essd_forecast_ahead_pv_watts"
    }
    assert pv["00"] == pytest.approx(1.5)  # the mean of steps 0..3
    assert pv["23"] == pytest.approx(93.5)
    assert got[("essd_forecast_pv_watts", ())] == 0.0
