"""Dispatch with flexible loads: 1 battery, 10 EV chargers, 96 steps of 15 min.

``optimizer.resolve_ms.1b10ev96`` is the median re-solve of the same Dispatcher as the day
moves on (a cycle every 60 s of simulated time, as in bench_optimizer): each cycle the battery
SoC and the vehicles' remaining energy move by the applied first step, the load forecast is
redrawn (+-3 %), vehicles arrive and leave on a workplace timeline (10 sessions, 07:00-09:00
arrivals, 16:00-18:30 departures, 10-40 kWh each) and the site import limit is 60 kW.
``optimizer.first_solve_ms.1b10ev96`` is the cold first solve.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import numpy as np

from benchmarks import Result
from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs
from essd.dispatch.flex import FlexSpec
from essd.dispatch.sessions import FlexSession
from essd.domain import LiveLimits, Plan

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
CYCLE_S = 60.0
STEPS = 96
STEP_S = 900.0
CHARGERS = 10


def _sessions(rng: np.random.Generator) -> list[FlexSession]:
    return [
        FlexSession(
            id=f"s{i}",
            charger_id=f"cp{i}",
            arrival_s=T0 + 3600.0 * float(rng.uniform(7.0, 9.0)),
            departure_s=T0 + 3600.0 * float(rng.uniform(16.0, 18.5)),
            energy_needed_wh=float(rng.uniform(10_000.0, 40_000.0)),
            max_power_w=11_000.0,
            min_power_w=4_140.0,
        )
        for i in range(CHARGERS)
    ]


def _inputs(
    now: float, soc: float, sessions: list[FlexSession], rng: np.random.Generator
) -> DispatchInputs:
    start = now - (now % STEP_S)
    t = start + STEP_S * np.arange(STEPS)
    hour = (t % 86400.0) / 3600.0
    load = 8000.0 * (1.0 + 0.5 * np.sin(2 * np.pi * (hour - 8) / 24))
    pv = np.maximum(0.0, 30_000.0 * np.sin(2 * np.pi * (hour - 6) / 24))
    price = 0.25 + 0.12 * np.sin(2 * np.pi * (hour - 13) / 24)
    live = [s for s in sessions if s.departure_s > now]
    return DispatchInputs(
        time=now,
        step_s=STEP_S,
        soc={"bat": soc},
        limits={"bat": LiveLimits(25_000.0, 25_000.0)},
        reserve_soc={"bat": 0.1},
        max_soc={"bat": 0.95},
        load_w=(load * rng.uniform(0.97, 1.03, STEPS)).tolist(),
        pv_w=pv.tolist(),
        import_price=price.tolist(),
        export_price=(0.5 * price).tolist(),
        carbon_intensity=(0.3 + 0.1 * np.cos(2 * np.pi * t / 86400)).tolist(),
        carbon_price_per_kg=0.05,
        import_limit_w=60_000.0,
        export_limit_w=30_000.0,
        sessions=live,
    )


def _advance(sessions: list[FlexSession], plan: Plan, now: float) -> list[FlexSession]:
    out = []
    for s in sessions:
        p = plan.session_power_w.get(s.id)
        if p and s.arrival_s <= now:
            got = max(-p[0], 0.0) * CYCLE_S / 3600.0 * s.charge_efficiency
            out.append(replace(s, energy_needed_wh=max(s.energy_needed_wh - got, 0.0)))
        else:
            out.append(s)
    return out


def run() -> list[Result]:
    """First solve and re-solves over a working day (06:00-20:00) of the 1 x 10 EV x 96 site."""
    rng = np.random.default_rng(19)
    sessions = _sessions(rng)
    dispatcher = Dispatcher(
        [BatterySpec("bat", 50_000.0)], STEPS, step_s=STEP_S, flex=FlexSpec(CHARGERS)
    )
    now = T0 + 6 * 3600.0
    soc = 0.5
    started = time.perf_counter()
    plan = dispatcher.solve(_inputs(now, soc, sessions, rng), budget_s=60.0, last_plan=None)
    first_ms = (time.perf_counter() - started) * 1000.0
    times: list[float] = []
    while now < T0 + 20 * 3600.0:
        sessions = _advance(sessions, plan, now)
        soc -= plan.power_w["bat"][0] * CYCLE_S / 3600.0 / 50_000.0
        soc = min(max(soc, 0.0), 1.0)
        now += CYCLE_S * 7  # every 7th cycle: a day's shape in ~120 solves
        inputs = _inputs(now, soc, sessions, rng)
        started = time.perf_counter()
        plan = dispatcher.solve(inputs, budget_s=60.0, last_plan=plan)
        times.append(time.perf_counter() - started)
        if plan.rung.value > 2 or not math.isfinite(plan.objective):
            raise RuntimeError(f"benchmark solve fell back: {plan.reason}")
    return [
        Result("optimizer.first_solve_ms.1b10ev96", first_ms, "ms"),
        Result("optimizer.resolve_ms.1b10ev96", statistics.median(times) * 1000.0, "ms"),
        Result("optimizer.resolve_max_ms.1b10ev96", max(times) * 1000.0, "ms"),
    ]
