"""Runs a charger scenario (``profiles/scenarios/ev/``) end to end: simulated OCPP charge points
(hil_sim.chargers, the ``ocpp`` library's client) connect over loopback WebSockets to essd's
central system; vehicles arrive and leave on the scenario's timeline; every cycle the session
book turns what the chargers report into LP sessions, the dispatcher plans site battery and
vehicles together, and the central system sends each charger its TxProfile.

``mode="now"`` is the baseline evcc calls "now": no profile is ever sent, every vehicle charges
at the charger's full power from arrival until it is full; the site battery is still dispatched
(by the same LP, blind to the vehicles).

Time is a stepped SimClock; load and PV are what the scenario says (the forecast is perfect,
for both modes alike). The worst-case grid power is checked every cycle from the limits in
force at the chargers (not from the plan): load - PV - battery + sum over charging vehicles of
min(charger limit, vehicle limit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from essd.clock import SimClock
from essd.config_ev import ChargerConfig, OcppConfig
from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs
from essd.dispatch.flex import FlexSpec
from essd.dispatch.sessions import FlexSession
from essd.domain import FallbackRung, LiveLimits
from essd.flexloads import (
    SessionBook,
    SessionRequest,
    charge_limits_w,
    clamp_to_headroom,
    fallback_limits_w,
)
from essd.hil.ev_scenario import EvScenario, SiteSpec, VehicleSpec
from essd.ocpp import CentralSystem
from hil_sim.chargers import ChargerLink, SimStation, SimVehicle


@dataclass(frozen=True, slots=True)
class VehicleOutcome:
    """What one vehicle got: requested and delivered battery energy (Wh), and the shortfall
    the last plan before its departure published for it (0 when none)."""

    charger: str
    arrive_h: float
    leave_h: float
    requested_wh: float
    delivered_wh: float
    published_shortfall_wh: float


@dataclass(slots=True)
class ChargerRunResult:
    """KPIs of one run."""

    mode: str
    cost: float = 0.0
    export_wh: float = 0.0
    pv_wh: float = 0.0
    max_grid_w: float = 0.0  # worst case within each cycle, from the limits in force
    vehicles: list[VehicleOutcome] = field(default_factory=list)
    rungs: dict[int, int] = field(default_factory=dict)
    profiles_rejected: int = 0
    final_battery_wh: float = 0.0

    @property
    def self_use(self) -> float:
        """Share of the PV energy used on site (not exported)."""
        return 1.0 - self.export_wh / self.pv_wh if self.pv_wh > 0 else math.nan


def site_profile(site: SiteSpec, start: float, t: float) -> tuple[float, float, float]:
    """Load W, PV W and import price at ``t`` (hourly values, PV a bell from 06:00 to 18:00)."""
    hour = ((t - start) / 3600.0) % 24.0
    pv = site.pv_peak_w * max(0.0, math.sin(math.pi * (hour - 6.0) / 12.0))
    return site.load_w[int(hour)], pv, site.import_price[int(hour)]


def site_inputs(
    sc: EvScenario, start: float, now: float, sessions: Sequence[FlexSession]
) -> DispatchInputs:
    """The site's dispatch inputs at ``now`` without a battery: a perfect forecast of the
    hourly profile over the horizon, step 0 as metered now."""
    site, step_s = sc.site, sc.step_s
    times = now - (now - start) % step_s + step_s * np.arange(sc.horizon_steps)
    prof = [site_profile(site, start, t + step_s / 2) for t in times]
    load, pv, _ = site_profile(site, start, now)
    prof[0] = (load, pv, prof[0][2])
    return DispatchInputs(
        time=now,
        step_s=step_s,
        soc={},
        limits={},
        reserve_soc={},
        max_soc={},
        load_w=[p[0] for p in prof],
        pv_w=[p[1] for p in prof],
        import_price=[p[2] for p in prof],
        export_price=[site.export_price] * sc.horizon_steps,
        import_limit_w=site.import_limit_w,
        export_limit_w=site.export_limit_w,
        sessions=sessions,
    )


class _Battery:
    """The site battery, ideal apart from its efficiencies (battery sign: > 0 discharges)."""

    def __init__(self, site: SiteSpec) -> None:
        self.capacity = site.battery_capacity_wh
        self.power = site.battery_power_w
        self.energy = site.battery_soc * self.capacity

    def run(self, power_w: float, seconds: float) -> float:
        """Apply ``power_w`` for ``seconds``; returns the AC power actually delivered."""
        h = seconds / 3600.0
        p = max(-self.power, min(self.power, power_w))
        if p > 0:
            p = min(p, self.energy * 0.95 / h)
            self.energy -= p * h / 0.95
        else:
            p = max(p, -(self.capacity - self.energy) / 0.95 / h)
            self.energy -= p * h * 0.95
        return p


class _ChargerRun:
    """One run's state; the cycle's phases are its methods."""

    def __init__(self, sc: EvScenario, mode: Literal["optimized", "now"]) -> None:
        self.sc, self.mode, self.site = sc, mode, sc.site
        self.start = sc.start.timestamp()
        self.clock = SimClock(self.start)
        self.validity = max(3.0 * sc.cycle_s, 30.0)
        self.has_battery = self.site.battery_capacity_wh > 0
        batteries = [BatterySpec("home", self.site.battery_capacity_wh)] if self.has_battery else []
        self.dispatcher = Dispatcher(
            batteries, sc.horizon_steps, step_s=sc.step_s, flex=FlexSpec(max(len(sc.chargers), 1))
        )
        self.battery = _Battery(self.site)
        self.book = SessionBook()
        self.result = ChargerRunResult(mode=mode)
        self.stations = {
            c.id: SimStation(
                c.id,
                self.clock,
                default_limit_w=c.max_power_w,
                rate_unit=c.rate_unit,
                phases=c.phases,
            )
            for c in sc.chargers
        }
        self.pending = sorted(sc.vehicles, key=lambda v: v.arrive_h)
        self.parked: dict[str, tuple[VehicleSpec, SimVehicle, float]] = {}
        self.shortfall: dict[str, float] = {}
        self.links: dict[str, ChargerLink] = {}

    def _outcome(self, cid: str) -> VehicleOutcome:
        spec, vehicle, initial = self.parked[cid]
        return VehicleOutcome(
            cid,
            spec.arrive_h,
            spec.leave_h,
            spec.energy_wh,
            vehicle.energy_wh - initial,
            self.shortfall.pop(cid, 0.0),
        )

    async def timeline(self, now: float) -> None:
        """Departures, then arrivals (a charger freed this cycle may take the next car)."""
        hours = (now - self.start) / 3600.0
        for cid, (spec, _, _) in list(self.parked.items()):
            if spec.leave_h <= hours + 1e-9:
                await self.links[cid].unplug(1)
                self.result.vehicles.append(self._outcome(cid))
                del self.parked[cid]
        while self.pending and self.pending[0].arrive_h <= hours + 1e-9:
            spec = self.pending.pop(0)
            # The car stops at its own limit: the energy asked for (both modes alike).
            vehicle = SimVehicle(
                spec.capacity_wh,
                spec.soc * spec.capacity_wh,
                spec.max_power_w,
                limit_soc=spec.soc + spec.energy_wh / spec.capacity_wh,
            )
            self.parked[spec.charger] = (spec, vehicle, vehicle.energy_wh)
            await self.links[spec.charger].plug_in(1, vehicle)
            if spec.tell_departure:
                self.book.request(
                    SessionRequest(
                        spec.charger,
                        departure_s=self.start + spec.leave_h * 3600.0,
                        energy_wh=spec.energy_wh,
                        set_at=now,
                    )
                )
        for cid in self.parked:
            await self.links[cid].meter_values(1)

    def inputs(self, now: float, sessions: list[FlexSession]) -> DispatchInputs:
        """The dispatch inputs of this cycle (perfect forecast; step 0 as metered now)."""
        inputs = site_inputs(self.sc, self.start, now, sessions)
        if not self.has_battery:
            return inputs
        b = self.battery
        return replace(
            inputs,
            soc={"home": b.energy / b.capacity},
            limits={"home": LiveLimits(b.power, b.power)},
            reserve_soc={"home": 0.1},
            max_soc={"home": 0.95},
        )

    async def decide(self, central: CentralSystem, now: float) -> float:
        """Plan, send the chargers their limits; returns the battery setpoint (W)."""
        site = self.site
        sessions = self.book.sessions(central.plugged(), now) if self.mode == "optimized" else []
        plan = self.dispatcher.solve(self.inputs(now, sessions), budget_s=30.0, last_plan=None)
        self.result.rungs[plan.rung.value] = self.result.rungs.get(plan.rung.value, 0) + 1
        load, pv, _ = site_profile(site, self.start, now)
        battery_w = plan.first_step_w("home") if self.has_battery else 0.0
        if self.mode != "optimized":
            return battery_w
        for s in sessions:
            self.shortfall[s.charger_id] = plan.slack.get(f"session_shortfall_wh[{s.id}]", 0.0)
        limits = charge_limits_w(plan, sessions, headroom_w=site.import_limit_w - plan.grid_w[0])
        if plan.rung.value > FallbackRung.SOFT.value or not plan.session_power_w:
            limits = fallback_limits_w(sessions, site.import_limit_w - (load - pv - battery_w))
        # The closed-loop check against what the meter says now.
        limits = clamp_to_headroom(limits, sessions, site.import_limit_w - (load - pv - battery_w))
        central.apply(limits, valid_s=self.validity)
        await central.drain()
        return battery_w

    def account(self, now: float, battery_w: float) -> None:
        """Run the cycle: vehicles charge (per station), the battery follows; book the grid."""
        sc, site, r = self.sc, self.site, self.result
        load, pv, price = site_profile(site, self.start, now)
        worst = load - pv - battery_w
        for cid, (_, vehicle, _) in self.parked.items():
            if not vehicle.full:
                worst += min(self.stations[cid].limit_w(1), vehicle.max_power_w)
        r.max_grid_w = max(r.max_grid_w, worst)
        before = sum(s.evses[1].meter_wh for s in self.stations.values())
        delivered_w = self.battery.run(battery_w, sc.cycle_s)
        self.clock.advance(sc.cycle_s)
        for station in self.stations.values():
            station.update()
        ev_wh = sum(s.evses[1].meter_wh for s in self.stations.values()) - before
        h = sc.cycle_s / 3600.0
        grid_wh = (load - pv - delivered_w) * h + ev_wh
        r.export_wh += max(-grid_wh, 0.0)
        r.pv_wh += pv * h
        r.cost += max(grid_wh, 0.0) / 1000.0 * price - max(-grid_wh, 0.0) / 1000.0 * (
            site.export_price
        )


async def run_chargers(sc: EvScenario, *, mode: Literal["optimized", "now"]) -> ChargerRunResult:
    """Run the scenario once; see the module docstring."""
    run = _ChargerRun(sc, mode)
    configs = [
        ChargerConfig(
            id=c.id,
            rate_unit=c.rate_unit,
            phases=c.phases,
            max_power_w=c.max_power_w,
            min_power_w=c.min_power_w,
            # The baseline controls nothing, not even the wait at the start of a session.
            initial_limit_w=0.0 if mode == "optimized" else None,
        )
        for c in sc.chargers
    ]
    ocpp = OcppConfig(port=0, profile_validity_s=min(run.validity, 3600.0))
    end = run.start + sc.duration_h * 3600.0
    async with CentralSystem(ocpp, configs, clock=run.clock) as central, AsyncExitStack() as stack:
        url = f"ws://127.0.0.1:{central.port}"
        for c in sc.chargers:
            link = ChargerLink(run.stations[c.id], url, version=c.version)
            run.links[c.id] = await stack.enter_async_context(link)
            await link.boot()
        while run.clock.now() < end - 1e-6:
            now = run.clock.now()
            await run.timeline(now)
            battery_w = await run.decide(central, now)
            run.account(now, battery_w)
        for cid in list(run.parked):
            run.result.vehicles.append(run._outcome(cid))
        run.result.final_battery_wh = run.battery.energy
        run.result.profiles_rejected = sum(c.rejected_profiles for c in central.chargers().values())
    return run.result
