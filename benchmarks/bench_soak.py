"""Soak: a week of 10-second cycles on the example site, on essd's own forecasts only.

The real control core (drivers over loopback Modbus, forecasters, optimizer, ladder, guard)
runs 60,480 cycles against hil_sim on a stepped clock. No series is given to the controller:
it learns load and PV from the meter, as a site does. The simulator plays a real-looking week
made from the example day: weekdays and a quieter weekend at the industrial park, sunny,
hazy and overcast days, and minute-to-minute noise on both load and PV (seeded, so every run
plays the same week).

Figures: ``soak.days``, ``soak.cycles``, ``soak.exceptions`` (exceptions out of a cycle plus
phases that failed inside one; must be 0), ``soak.rung1_share`` (cycles on the optimizer's
optimal plan; >= 0.995), ``soak.rss_growth_mb`` (resident memory at the end against the end
of the first day, when every cache is warm; <= 10), ``soak.violations`` (limit violations
of the simulated truth), and ``soak.wall_s``.

``ESSD_SOAK_DAYS`` shortens the run for a quick look (the figures then say so in their names
only through ``soak.days``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import time
from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from benchmarks import Result
from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.demo import EXAMPLE_SITE
from essd.domain import FallbackRung
from essd.events import CycleCompleted, Event, EventBus
from essd.series import read_series_csv
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries

CYCLE_S = 10.0
TZ = ZoneInfo("Asia/Shanghai")
# Monday 12 January 2026, local midnight.
START = datetime(2026, 1, 12, 0, 0, tzinfo=TZ).timestamp()
SEED = 20260112


def real_looking_week(days: int) -> SiteSeries:
    """``days`` days from the example day: weekday/weekend load, daily weather, noise."""
    t, cols = read_series_csv(EXAMPLE_SITE.with_suffix(".csv"), TZ)
    offsets = (t - t[0]) % 86_400.0
    rng = np.random.default_rng(SEED)
    weather = rng.choice([1.0, 0.75, 0.45, 0.2], size=days, p=[0.35, 0.3, 0.2, 0.15])
    times, load, pv = [], [], []
    for day in range(days):
        weekend = datetime.fromtimestamp(START + day * 86_400.0, TZ).weekday() >= 5
        level = (0.62 if weekend else 1.0) * rng.normal(1.0, 0.04)
        noise_l = rng.normal(1.0, 0.05, size=len(offsets))
        noise_p = np.clip(rng.normal(1.0, 0.12, size=len(offsets)), 0.3, 1.3)
        times.append(START + day * 86_400.0 + offsets)
        load.append(np.maximum(cols["load_w"] * level * noise_l, 2_000.0))
        pv.append(cols["pv_w"] * weather[day] * noise_p)
    columns = {
        "load_w": np.concatenate(load),
        "pv_w": np.concatenate(pv),
        "import_price": np.tile(cols["import_price"], days),
        "export_price": np.tile(cols["export_price"], days),
        "carbon_g_per_kwh": np.tile(cols["carbon_g_per_kwh"], days),
    }
    return SiteSeries(np.concatenate(times), columns, tz=TZ, source="soak week")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


async def _soak(days: int) -> list[Result]:
    settings = load_settings(EXAMPLE_SITE)
    settings = settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"enabled": False})}
    )
    assert settings.forecast.series_file is None  # built-in forecasters only
    clock = SimClock(START)
    bus = EventBus()
    rungs: Counter[FallbackRung] = Counter()
    phase_failures = 0

    def record(event: Event) -> None:
        nonlocal phase_failures
        if isinstance(event, CycleCompleted):
            rungs[event.plan.rung] += 1
            phase_failures += len(event.phase_errors)

    bus.subscribe(record)
    cycles_per_day = int(86_400 / CYCLE_S)
    exceptions = 0
    rss_day1 = 0.0
    started = time.perf_counter()
    async with SimulatedSite(
        settings, clock=clock, series=real_looking_week(days), free_ports=True, export_limiter=True
    ) as sim:
        pool = EndpointPool(clock=clock)
        ctl = build_controller(sim.settings, clock=clock, bus=bus, pool=pool)
        try:
            for k in range(days * cycles_per_day):
                try:
                    await ctl.run_cycle()
                except Exception:
                    exceptions += 1
                clock.advance(CYCLE_S)
                if k + 1 == cycles_per_day:
                    gc.collect()
                    rss_day1 = _rss_mb()
            truth = sim.truth()
        finally:
            await pool.close()
    wall = time.perf_counter() - started
    gc.collect()
    total = sum(rungs.values())
    growth = _rss_mb() - rss_day1 if days > 1 else float("nan")
    return [
        Result("soak.days", float(days), "days"),
        Result("soak.cycles", float(total), "cycles"),
        Result("soak.exceptions", float(exceptions + phase_failures), "count"),
        Result("soak.rung1_share", rungs[FallbackRung.OPTIMAL] / max(total, 1), "ratio"),
        Result("soak.rss_growth_mb", growth, "MB"),
        Result("soak.rss_day1_mb", rss_day1, "MB"),
        Result("soak.rss_end_mb", rss_day1 + growth if days > 1 else float("nan"), "MB"),
        Result("soak.violations", float(len(truth.violations)), "count"),
        Result("soak.wall_s", wall, "s"),
    ]


def run() -> list[Result]:
    """The week (or ``ESSD_SOAK_DAYS`` days)."""
    logging.getLogger("essd").setLevel(logging.ERROR)
    days = int(os.environ.get("ESSD_SOAK_DAYS", "7"))
    return asyncio.run(_soak(days))
