"""Runs a swap-station scenario (``profiles/scenarios/ev/``): a simulated station (hil_sim.swap)
with taxis arriving by a seeded Poisson process at the scenario's hourly rates, dispatched every
cycle by the LP through :func:`essd.dispatch.swap.swap_sessions`.

``mode="asap"`` is the baseline: each pack charges at its slot's full power as soon as it is
docked until it reaches the target SoC, the connection shared equally when it is short.

The service level is checked at every cycle start and right after every swap: the number of
packs at or above the target SoC, and whether any taxi found none (a missed swap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from essd.clock import SimClock
from essd.dispatch import Dispatcher
from essd.dispatch.flex import FlexSpec
from essd.dispatch.swap import PackState, SwapDemandLearner, SwapStationSpec, swap_sessions
from essd.flexloads import clamp_to_headroom
from essd.hil.ev_runner import site_inputs, site_profile
from essd.hil.ev_scenario import EvScenario, SwapSpec
from hil_sim.swap import SimPack, SimSwapStation, poisson_swaps


@dataclass(slots=True)
class SwapRunResult:
    """KPIs of one run."""

    mode: str
    cost: float = 0.0
    swaps: int = 0
    missed: int = 0
    min_charged: int = 10**9
    checks_below_level: int = 0
    checks: int = 0
    max_grid_w: float = 0.0
    rungs: dict[int, int] = field(default_factory=dict)
    final_stored_wh: float = 0.0


def _station(swap: SwapSpec, rng: random.Random) -> SimSwapStation:
    """The station at the start: two packs in three charged, the third half way."""
    packs = {
        f"slot{i:02d}": SimPack(
            f"slot{i:02d}",
            swap.pack_capacity_wh,
            # A fresh morning: most packs charged, some half way.
            swap.pack_capacity_wh * (swap.target_soc if i % 3 else 0.5),
            swap.slot_power_w,
        )
        for i in range(swap.slots)
    }
    return SimSwapStation(packs, swap.target_soc, rng, arrival_soc=swap.arrival_soc)


class _SwapRun:
    """One run's state; planning and the cycle are its methods."""

    def __init__(self, sc: EvScenario, swap: SwapSpec, mode: Literal["optimized", "asap"]) -> None:
        self.sc, self.swap, self.mode, self.site = sc, swap, mode, sc.site
        self.start = sc.start.timestamp()
        self.end = self.start + sc.duration_h * 3600.0
        self.clock = SimClock(self.start)
        # Simulation draws, not cryptography; the arrivals have their own generator so both
        # modes see the same taxis.
        self.station = _station(swap, random.Random(swap.seed))  # noqa: S311
        arrivals = random.Random(swap.seed + 1)  # noqa: S311
        self.pending = poisson_swaps(self.start, self.end, self.rate, arrivals)
        self.spec = SwapStationSpec(
            service_level=swap.service_level,
            target_soc=swap.target_soc,
            arrival_soc=sum(swap.arrival_soc) / 2,
            demand_margin=swap.demand_margin,
            demand_z=swap.demand_z,
        )
        # The packs in the slots and the packs the next swaps dock (the rest follow in later
        # cycles as the horizon moves on).
        self.columns = swap.slots + 10
        self.dispatcher = Dispatcher(
            [], sc.horizon_steps, step_s=sc.step_s, flex=FlexSpec(self.columns)
        )
        self.learner = SwapDemandLearner(prior_per_hour=float(np.mean(swap.swaps_per_hour)))
        self.result = SwapRunResult(mode=mode)

    def rate(self, t: float) -> float:
        """Swaps per hour at ``t`` (the scenario's hourly rates)."""
        return self.swap.swaps_per_hour[int(((t - self.start) / 3600.0) % 24)]

    def check(self) -> None:
        """Count the charged packs against the service level."""
        charged, r = self.station.charged(), self.result
        r.checks += 1
        r.min_charged = min(r.min_charged, charged)
        r.checks_below_level += charged < self.swap.service_level

    def plan_power(self, now: float, headroom: float) -> dict[str, float]:
        """Slot powers from the LP over the swap sessions (W)."""
        sc, station = self.sc, self.station
        step0 = now - (now - self.start) % sc.step_s
        times = step0 + sc.step_s * np.arange(sc.horizon_steps)
        if self.swap.demand == "series":
            demand = [self.rate(t + sc.step_s / 2) * sc.step_s / 3600.0 for t in times]
        else:
            self.learner.close_hour(now)
            demand = self.learner.forecast(now, sc.step_s, sc.horizon_steps)
        packs = [
            PackState(p.slot, p.soc, p.capacity_wh, p.max_charge_w, p.efficiency)
            for p in station.packs.values()
        ]
        sessions = swap_sessions(
            self.spec, packs, demand, now=now, step_s=sc.step_s, columns=self.columns
        )
        inputs = site_inputs(sc, self.start, now, sessions)
        plan = self.dispatcher.solve(inputs, budget_s=30.0, last_plan=None)
        self.result.rungs[plan.rung.value] = self.result.rungs.get(plan.rung.value, 0) + 1
        power = {}
        for s in sessions:
            if not s.id.startswith("pack:"):
                continue
            power[s.charger_id] = max(-plan.session_power_w.get(s.id, (0.0,))[0], 0.0)
            # A pack due within the first step charges at full power now: the plan spreads
            # a step's energy over the step, the taxis may come at its start.
            if s.energy_needed_wh > 0 and s.departure_s <= now + sc.step_s:
                power[s.charger_id] = s.max_power_w
        return clamp_to_headroom(power, sessions, headroom)

    def asap_power(self, headroom: float) -> dict[str, float]:
        """The baseline: every pack below target at full slot power, the connection shared."""
        target = self.swap.target_soc
        wanting = [s for s, p in self.station.packs.items() if p.soc < target - 1e-9]
        share = max(headroom, 0.0) / len(wanting) if wanting else 0.0
        return {s: min(self.swap.slot_power_w, share) for s in wanting}

    def cycle(self) -> None:
        """One cycle: check, decide, run with the swaps that fall into it, book the grid."""
        sc, station, r = self.sc, self.station, self.result
        now = self.clock.now()
        self.check()
        load, pv, price = site_profile(self.site, self.start, now)
        headroom = self.site.import_limit_w - (load - pv)
        if self.mode == "optimized":
            station.set_power(self.plan_power(now, headroom))
        else:
            station.set_power(self.asap_power(headroom))
        r.max_grid_w = max(r.max_grid_w, load - pv + station.drawn_w())
        t, cycle_end = now, min(now + sc.cycle_s, self.end)
        energy = 0.0
        while self.pending and self.pending[0] < cycle_end:
            at = self.pending.pop(0)
            energy += station.run(at - t)
            t = at
            event = station.swap(at)
            self.learner.observe(at)
            r.swaps += 1
            r.missed += event.missed
            self.check()
            if self.mode == "asap":  # the docked pack starts at once, within the headroom
                power = dict(station.power_w)
                power[event.slot] = self.swap.slot_power_w
                station.set_power(clamp_to_headroom(power, [], headroom))
        energy += station.run(cycle_end - t)
        self.clock.advance(cycle_end - now)
        grid_wh = (load - pv) * (cycle_end - now) / 3600.0 + energy
        r.cost += max(grid_wh, 0.0) / 1000.0 * price
        r.cost -= max(-grid_wh, 0.0) / 1000.0 * self.site.export_price


def run_swap(sc: EvScenario, *, mode: Literal["optimized", "asap"]) -> SwapRunResult:
    """Run the scenario once; see the module docstring."""
    if sc.swap is None:
        raise ValueError("swap: this scenario has no swap station")
    run = _SwapRun(sc, sc.swap, mode)
    while run.clock.now() < run.end - 1e-6:
        run.cycle()
    run.result.final_stored_wh = sum(p.energy_wh for p in run.station.packs.values())
    return run.result
