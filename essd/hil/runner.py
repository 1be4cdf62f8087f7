"""Run a scenario: the real control core against a simulated site, on a stepped clock.

The daemon core (:func:`essd.daemon.build_controller`: real drivers, real Modbus over
loopback, the real optimizer and safety supervisor) runs one cycle per ``cycle_period``; the
clock is advanced by hand between cycles, in sub-steps of at most a minute, and the plant's
true state is sampled at each sub-step. Faults start and clear on the timeline at sub-step
boundaries. After the run the same site is solved offline with perfect knowledge of the true
series (the optimizer's own LP over the whole scenario) to say how much of the achievable
saving the daemon took.

Battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import ForecastConfig, Settings
from essd.cycle import Controller
from essd.daemon import build_controller
from essd.domain import LiveLimits
from essd.events import CycleCompleted, EventBus
from essd.forecast import Forecaster
from essd.hil.hostile import DaemonClock, EventDriver, event_summary, mqtt_limits, safe_after_s
from essd.hil.kpi import (
    CostModel,
    CycleRecord,
    Kpis,
    Limits,
    PriceTrace,
    Sample,
    compute_kpis,
    grid_cost,
    unsafe_writes,
)
from essd.hil.plant import (
    BatteryTruth,
    Plant,
    SiteTruth,
)
from essd.hil.scenario import INSTANT_KINDS, FaultSpec, Scenario, site_mqtt
from essd.optimizer import Dispatcher, DispatchInputs
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries

__all__ = [
    "PlantFactory",
    "RunResult",
    "ScenarioSeries",
    "check_expectations",
    "cost_model",
    "run_scenario",
]

log = logging.getLogger(__name__)

SUBSTEP_S = 60.0


class ScenarioSeries:
    """The scenario's true series, as a CSV the forecaster reads and as functions of time."""

    def __init__(self, scenario: Scenario, settings: Settings, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "series.csv"
        spec = scenario.series
        if spec.file is not None:
            self.path.write_text(
                scenario.resolve(spec.file).read_text(encoding="utf-8"), encoding="utf-8"
            )
        else:
            inline = spec.inline
            assert inline is not None
            cols = [
                c
                for c in ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")
                if getattr(inline, c)
            ]
            with self.path.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["time", *cols])
                for k in range(len(inline.load_w)):
                    t = scenario.start_epoch + k * inline.step_s
                    w.writerow([f"{t:.0f}", *(getattr(inline, c)[k] for c in cols)])
        # Prices are read through the daemon's own forecaster (the same file, the same tariff
        # fallback): a price holds until the next sample. Load and PV are interpolated linearly
        # between samples, as hil_sim does: a real load does not jump every quarter hour.
        self._tz = ZoneInfo(settings.site.timezone)
        source = ForecastConfig(
            load="file",
            pv="file",
            series_file=self.path,
            carbon_intensity_g_per_kwh=settings.forecast.carbon_intensity_g_per_kwh,
        )
        self._truth = Forecaster(source, settings.tariff, settings.site.timezone)
        self._truth_carbon_default = settings.forecast.carbon_intensity_g_per_kwh
        self._table = _read_table(self.path, self._tz)
        times, _, columns = self._table
        # Daily profiles wrap around midnight: the day's first sample follows its last.
        self._wrapped = {
            c: (
                np.concatenate([times - 86_400.0, times, times + 86_400.0]),
                np.concatenate([v, v, v]),
            )
            for c, v in columns.items()
        }
        self._cache: dict[float, tuple[float, float, float, float, float]] = {}

    def _linear(self, column: str, t: float) -> float:
        times, daily, cols = self._table
        values = cols.get(column)
        if values is None:
            return 0.0
        if daily:
            day = datetime.fromtimestamp(t, tz=self._tz)
            midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            xs, ys = self._wrapped[column]
            return float(np.interp(t - midnight, xs, ys))
        return float(np.interp(t, times, values))

    def at(self, t: float) -> tuple[float, float, float, float, float]:
        """(load W, PV W, import price, export price, carbon g/kWh) at epoch ``t``."""
        hit = self._cache.get(t)
        if hit is None:
            f = self._truth.forecast(t, 60.0, 1)
            hit = (
                self._linear("load_w", t),
                self._linear("pv_w", t),
                float(f.import_price[0]),
                float(f.export_price[0]),
                float(f.carbon_g_per_kwh[0]),
            )
            self._cache[t] = hit
        return hit

    def write_forecast(self, path: Path, start: float, end: float, step_s: float) -> ForecastConfig:
        """The truth resampled every ``step_s`` from ``start`` to ``end`` as the daemon's series
        file ("perfect" forecasts: the daemon holds each sample, so a fine resampling keeps its
        view of the linear truth close)."""
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["time", *_COLUMNS])
            t = start
            while t <= end:
                w.writerow([f"{t:.0f}", *(f"{v:.6g}" for v in self.at(t))])
                t += step_s
        return ForecastConfig(
            load="file",
            pv="file",
            series_file=path,
            carbon_intensity_g_per_kwh=self._truth_carbon_default,
        )

    def load_w(self, t: float) -> float:
        """True load (W)."""
        return self.at(t)[0]

    def pv_w(self, t: float) -> float:
        """True available PV (W)."""
        return self.at(t)[1]


def _read_table(
    path: Path, tz: ZoneInfo
) -> tuple[npt.NDArray[np.float64], bool, dict[str, npt.NDArray[np.float64]]]:
    """Sample times and load/PV columns of a series CSV; daily files as seconds of the day."""
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    times = []
    for row in rows:
        raw = row["time"]
        try:
            times.append(float(raw))
        except ValueError:
            dt = datetime.fromisoformat(raw)
            times.append((dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp())
    t = np.asarray(times, dtype=np.float64)
    cols = {
        c: np.asarray([float(r[c]) for r in rows], dtype=np.float64)
        for c in ("load_w", "pv_w")
        if rows and c in rows[0]
    }
    daily = float(t[-1] - t[0]) < 86_400.0
    if daily:
        first = datetime.fromtimestamp(float(t[0]), tz=tz)
        midnight = first.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        offsets = (t - midnight) % 86_400.0
        order = np.argsort(offsets)
        t = offsets[order]
        cols = {c: v[order] for c, v in cols.items()}
    return t, daily, cols


_COLUMNS = ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")

PlantFactory = Callable[
    [Scenario, Settings, SimClock, ScenarioSeries], AbstractAsyncContextManager[Plant]
]


@dataclass
class RunResult:
    """A finished run: its figures, the expectations that failed, and the raw traces."""

    scenario: Scenario
    kpis: Kpis
    failures: list[str]
    samples: list[Sample]
    cycles: list[CycleRecord]
    limits: Limits
    settings: Settings
    currency: str = "CNY"
    report_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every expectation held."""
        return not self.failures


def _record(event: CycleCompleted, faults: tuple[str, ...]) -> CycleRecord:
    errors = sum(sum(c.errors_total.values()) for c in event.device_counters.values())
    writes = sum(c.writes_total for c in event.device_counters.values())
    return CycleRecord(
        cycle=event.cycle,
        time=event.time,
        rung=int(event.plan.rung),
        reason=event.plan.reason,
        setpoints_w={d: sp.power_w for d, sp in event.setpoints.items()},
        device_states={d: s.value for d, s in event.device_states.items()},
        grid_belief_w=event.grid_power_w,
        modbus_errors=errors,
        device_writes=writes,
        active_faults=faults,
        setpoint_sources={d: sp.source for d, sp in event.setpoints.items()},
        cause=event.plan.cause.value,
    )


def _limits(controller: Controller, settings: Settings, scenario: Scenario) -> Limits:
    envs = {d.id: d.envelope for d in controller.batteries if d.envelope is not None}
    spec = scenario.site
    imp, exp = spec.grid_import_limit_w, spec.grid_export_limit_w
    return Limits(
        reserve_soc={k: e.reserve_soc for k, e in envs.items()},
        max_soc={k: e.max_soc for k, e in envs.items()},
        max_charge_w={k: e.max_charge_w for k, e in envs.items()},
        max_discharge_w={k: e.max_discharge_w for k, e in envs.items()},
        import_limit_w=settings.site.grid_import_limit_w if imp is None else imp,
        export_limit_w=settings.site.grid_export_limit_w if exp is None else exp,
        site_tolerance_w=scenario.expect.site_limit_tolerance_w,
        commanded=frozenset(k for k, e in envs.items() if e.can_discharge),
    )


def cost_model(scenario: Scenario, settings: Settings) -> CostModel:
    """The tariff terms the figures of ``scenario`` are costed with."""
    return CostModel(
        carbon_price_per_kg=settings.tariff.carbon_price_per_kg,
        demand_charge_per_kw=settings.tariff.demand_charge_per_kw,
        demand_window_s=settings.control.step_s,
        export_limiter=scenario.site.export_limiter,
        export_limit_w=settings.site.grid_export_limit_w,
    )


def perfect_foresight(
    scenario: Scenario,
    *,
    controller: Controller,
    series: ScenarioSeries,
    first: SiteTruth,
    final_soc: Mapping[str, float],
    model: CostModel,
) -> tuple[float | None, str]:
    """Cost of the best dispatch knowing the true series, solved offline over the whole run.

    The optimizer's own LP over the scenario, from the true initial SoC, must end at least
    where the daemon ended (so stored energy is not counted as a saving); portable units are
    unavailable while unplugged. Faults other than unplugging are unknown to it: the optimum
    is an upper bound on what any controller could save.
    """
    if not controller.specs:
        return None, "no batteries"
    settings = controller.settings
    step = settings.control.step_s
    steps = max(1, math.ceil(scenario.duration / step))
    start = scenario.start_epoch
    times = [start + k * step for k in range(steps)]
    values = [series.at(t) for t in times]
    envs = {d.id: d.envelope for d in controller.batteries if d.envelope is not None}
    availability: dict[str, list[bool]] = {}
    for f in scenario.faults:
        if f.kind == "unplugged" and f.device in envs:
            row = availability.setdefault(f.device, [True] * steps)
            for k, t in enumerate(times):
                if start + f.at <= t < start + f.end or start + f.at < t + step <= start + f.end:
                    row[k] = False
    limiter = scenario.site.export_limiter
    inputs = DispatchInputs(
        time=start,
        step_s=step,
        soc={k: first.batteries[k].soc for k in envs},
        limits={k: LiveLimits(e.max_charge_w, e.max_discharge_w) for k, e in envs.items()},
        reserve_soc={k: min(e.reserve_soc, first.batteries[k].soc) for k, e in envs.items()},
        max_soc={k: max(e.max_soc, first.batteries[k].soc) for k, e in envs.items()},
        load_w=[v[0] for v in values],
        pv_w=[v[1] for v in values],
        import_price=[v[2] for v in values],
        export_price=[v[3] for v in values],
        availability=availability,
        carbon_intensity=[v[4] / 1000.0 for v in values],
        carbon_price_per_kg=model.carbon_price_per_kg,
        demand_charge_per_kw=model.demand_charge_per_kw,
        import_limit_w=settings.site.grid_import_limit_w,
        export_limit_w=math.inf if limiter else settings.site.grid_export_limit_w,
        terminal_soc={
            k: min(max(final_soc.get(k, e.reserve_soc), e.reserve_soc), e.max_soc)
            for k, e in envs.items()
        },
    )
    dispatcher = Dispatcher(
        controller.specs,
        steps,
        solver="HIGHS",
        step_s=step,
        change_cost_per_kw=0.0,
        terminal_shortfall_cost_per_kwh=100.0,
    )
    plan = dispatcher.solve(inputs, budget_s=60.0, last_plan=None)
    battery = np.zeros(steps)
    for dev in plan.device_ids:
        battery += np.asarray(plan.power_w[dev][:steps])
    grid = [v[0] - v[1] - b for v, b in zip(values, battery.tolist(), strict=True)]
    if limiter:
        grid = [
            max(g, -settings.site.grid_export_limit_w) if v[1] > 0 else g
            for g, v in zip(grid, values, strict=True)
        ]
    trace = PriceTrace(
        times=times,
        dt_s=[step] * steps,
        import_price=[v[2] for v in values],
        export_price=[v[3] for v in values],
        carbon_g_per_kwh=[v[4] for v in values],
    )
    cost = grid_cost(grid, trace, model)
    return cost.total, f"rung {int(plan.rung)}: {plan.reason}"


def report_window(scenario: Scenario, i: int) -> tuple[float, float]:
    """Offsets (s) during which cycles are attributed to fault ``i``: its duration, or two
    cycles for an instant fault (a mode reset, a dropped connection)."""
    f = scenario.faults[i]
    return f.at, max(f.end, f.at + 2 * scenario.cycle_period)


def _fault_summary(
    scenario: Scenario,
    cycles: Sequence[CycleRecord],
    unsafe: Sequence[str],
    samples: Sequence[Sample] = (),
    batteries: Sequence[str] = (),
) -> list[dict[str, Any]]:
    start = scenario.start_epoch
    out = []
    for i, f in enumerate(scenario.faults):
        label = f"{i}:{f.kind}:{f.device}"

        def concerned(c: CycleRecord, f: FaultSpec = f) -> list[str]:
            return sorted(c.setpoints_w) if f.kind == "meter_loss" else [f.device]

        during = [c for c in cycles if label in c.active_faults]
        after = [c for c in cycles if c.time >= start + report_window(scenario, i)[1]]
        states = sorted({c.device_states.get(f.device, "?") for c in during})
        recovered_at = next(
            (c.time - (start + f.end) for c in after if c.device_states.get(f.device) == "running"),
            None,
        )
        # Every unit is affected by a meter fault: the site limits rest on the meter.
        units = list(batteries) if f.device not in batteries else [f.device]
        window_end = start + report_window(scenario, i)[1]
        out.append(
            {
                "index": i,
                "kind": f.kind,
                "device": f.device,
                "at_s": f.at,
                "duration_s": f.duration,
                "cycles": len(during),
                "worst_rung": max((c.rung for c in during), default=0),
                "rungs": sorted({c.rung for c in during}),
                "device_states": states,
                "setpoint_sources": sorted(
                    {c.setpoint_sources.get(d, "-") for c in during for d in concerned(c)}
                ),
                # For a meter fault every unit is concerned: without the meter the site limits
                # cannot be verified, so all of them must idle.
                "setpoint_w_max": max(
                    (abs(c.setpoints_w.get(d, 0.0)) for c in during for d in concerned(c)),
                    default=0.0,
                ),
                "safe_idle_cycles": sum(
                    1
                    for c in during
                    if all(
                        c.setpoint_sources.get(d) == "safe" or c.setpoints_w.get(d, 0.0) == 0.0
                        for d in concerned(c)
                    )
                ),
                "unsafe_writes": [
                    u for u in unsafe if any(u.startswith(f"cycle {c.cycle}:") for c in during)
                ],
                "recovered_after_s": recovered_at,
                "safe_after_s": safe_after_s(samples, units, start + f.at, window_end),
                "reasons": sorted({c.reason for c in during})[:3],
            }
        )
    return out


def _daemon_totals(controller: Controller) -> dict[str, float]:
    """The totals and billing peak essd itself kept (its durable state), to set against the
    truth: a wall-clock step must add or remove nothing."""
    state = controller.durable_state()
    totals = {f"{k}": float(v) for k, v in state["totals"].items()}
    totals["billing_peak_w"] = float(state["peak"]["peak_w"])
    return totals


def check_expectations(kpis: Kpis, scenario: Scenario) -> list[str]:
    """One line per expectation that failed, naming it (empty when all hold)."""
    e = scenario.expect
    fails = []
    if kpis.violations > e.max_violations:
        fails.append(
            f"max_violations: {kpis.violations} violations > {e.max_violations} "
            f"({dict(kpis.violations_by_kind)})"
        )
    if kpis.worst_rung > e.worst_rung:
        fails.append(f"worst_rung: rung {kpis.worst_rung} reached, at most {e.worst_rung} allowed")
    if e.max_cost_ratio is not None and (
        kpis.cost_ratio is None or kpis.cost_ratio > e.max_cost_ratio
    ):
        fails.append(f"max_cost_ratio: cost/baseline {kpis.cost_ratio} > {e.max_cost_ratio}")
    if e.min_savings is not None and kpis.savings < e.min_savings:
        fails.append(f"min_savings: saved {kpis.savings:.2f} < {e.min_savings}")
    if e.min_savings_vs_optimum is not None and (
        kpis.savings_vs_optimum is None or kpis.savings_vs_optimum < e.min_savings_vs_optimum
    ):
        fails.append(
            f"min_savings_vs_optimum: {kpis.savings_vs_optimum} of the perfect-foresight "
            f"savings < {e.min_savings_vs_optimum}"
        )
    if e.max_peak_import_w is not None and kpis.peak_import_w > e.max_peak_import_w:
        fails.append(
            f"max_peak_import_w: peak import {kpis.peak_import_w:.0f} W > {e.max_peak_import_w}"
        )
    if e.max_export_wh is not None and kpis.exported_wh > e.max_export_wh:
        fails.append(f"max_export_wh: exported {kpis.exported_wh:.0f} Wh > {e.max_export_wh}")
    if e.min_self_consumption is not None and (
        kpis.self_consumption_ratio is None or kpis.self_consumption_ratio < e.min_self_consumption
    ):
        fails.append(
            f"min_self_consumption: {kpis.self_consumption_ratio} < {e.min_self_consumption}"
        )
    if kpis.unsafe_writes > e.max_unsafe_writes:
        fails.append(f"max_unsafe_writes: {kpis.unsafe_writes} unsafe setpoints written")
    if e.min_rung_during_faults is not None:
        for f in kpis.faults:
            if f["worst_rung"] < e.min_rung_during_faults:
                fails.append(
                    f"min_rung_during_faults: fault {f['index']} ({f['kind']} on {f['device']}) "
                    f"left the ladder at rung {f['worst_rung']}"
                )
    return fails


@dataclass
class _Session:
    """One run in progress: drives cycles and the clock, switches faults, samples the truth."""

    scenario: Scenario
    plant: Plant
    events: EventDriver
    clock: SimClock
    series: ScenarioSeries
    samples: list[Sample] = field(default_factory=list)
    cycles: list[CycleRecord] = field(default_factory=list)
    active: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)

    def label(self, i: int) -> str:
        f = self.scenario.faults[i]
        return f"{i}:{f.kind}:{f.device}"

    def sync_faults(self) -> tuple[str, ...]:
        """Start and end faults due by the clock's now; the labels of those in their window."""
        offset = self.clock.now() - self.scenario.start_epoch
        for i, f in enumerate(self.scenario.faults):
            if i not in self.started and f.at <= offset:
                self.started.add(i)
                self.plant.set_fault(f, True)
                self.active.add(i)
            if i in self.active and (f.kind in INSTANT_KINDS or f.end <= offset):
                if f.kind not in INSTANT_KINDS:
                    self.plant.set_fault(f, False)
                self.active.discard(i)
        return tuple(
            self.label(i)
            for i in range(len(self.scenario.faults))
            if report_window(self.scenario, i)[0] <= offset < report_window(self.scenario, i)[1]
        )

    def clear_faults(self) -> None:
        """End every fault still on (the run ended or failed)."""
        for i in sorted(self.active):
            f = self.scenario.faults[i]
            if f.kind not in INSTANT_KINDS:
                self.plant.set_fault(f, False)
        self.active = set()

    async def run(self) -> None:
        """Every cycle of the scenario; between cycles the clock moves in sub-steps.

        With a stepped clock (``speed: null``) the runner moves it; with a running one it
        sleeps on it, and each sample then holds until the next one is taken (the cycles
        themselves take clock time too).
        """
        sc = self.scenario
        period = sc.cycle_period
        sub = min(SUBSTEP_S, period)
        stop = sc.start_epoch + sc.cycles * period
        for k in range(sc.cycles):
            t_cycle = sc.start_epoch + k * period
            if sc.speed is None:
                self.clock.set(max(t_cycle, self.clock.now()))
            elif self.clock.now() < t_cycle:
                await self.clock.sleep(t_cycle - self.clock.now())
            faults = self.sync_faults()
            started = self.clock.now()
            controller = await self.events.due(started)
            faults += self.events.labels(started - sc.start_epoch)
            if controller is not None:  # None: essd is down after a signal
                event = await controller.run_cycle()
                # The simulator's time, not the daemon's wall clock (which an event may step).
                self.cycles.append(replace(_record(event, faults), time=started))
            end = t_cycle + period
            first = True
            while self.clock.now() < end - 1e-6:
                t = self.clock.now()
                dt = min(sub, end - t)
                if not first:
                    faults = self.sync_faults() + self.events.labels(t - sc.start_epoch)
                _, _, pi, pe, ci = self.series.at(t)
                self.samples.append(Sample(t, dt, self.plant.truth(), pi, pe, ci, first, faults))
                first = False
                if sc.speed is None:
                    self.clock.advance(dt)
                else:
                    await self.clock.sleep(dt)
        # Each sample holds until the next one (exactly dt on a stepped clock).
        times = [s.time for s in self.samples[1:]] + [stop]
        self.samples = [
            replace(s, dt_s=max(0.0, nxt - s.time))
            for s, nxt in zip(self.samples, times, strict=True)
        ]


async def run_scenario(
    scenario: Scenario,
    settings: Settings,
    *,
    workdir: Path,
    plant_factory: PlantFactory | None = None,
    progress: Callable[[CycleCompleted], None] | None = None,
) -> RunResult:
    """Run ``scenario`` to the end and return its figures (no files but the series CSV)."""
    wall0 = time.perf_counter()
    series = ScenarioSeries(scenario, settings, workdir)
    horizon = settings.control.step_s * settings.control.horizon_steps
    forecast = series.write_forecast(
        workdir / "forecast.csv",
        scenario.start_epoch,
        scenario.start_epoch + scenario.duration + horizon,
        min(scenario.cycle_period, 300.0),
    )
    if scenario.series.forecast == "learned":
        forecast = forecast.model_copy(update={"load": "daily-profile", "pv": "none"})
    settings = settings.model_copy(update={"forecast": forecast})
    clock = SimClock(scenario.start_epoch, speed=scenario.speed)
    # The daemon's view of the time: a wall-clock step event moves its wall clock alone.
    view = DaemonClock(clock)
    bus = EventBus()
    if progress is not None:
        report = progress
        bus.subscribe(lambda ev: report(ev) if isinstance(ev, CycleCompleted) else None)
    factory = simulated_site_factory if plant_factory is None else plant_factory
    async with factory(scenario, settings, clock, series) as plant:
        served = plant.settings.model_copy(update={"forecast": forecast})

        def build() -> tuple[Controller, EndpointPool]:
            pool = EndpointPool(clock=view)
            return build_controller(served, clock=view, bus=bus, pool=pool), pool

        command_limits, queue_size = mqtt_limits(site_mqtt(scenario), served)
        events = EventDriver(
            scenario.events,
            scenario.start_epoch,
            scenario.cycle_period,
            view,
            build,
            command_limits,
            queue_size,
        )
        first = plant.truth()
        session = _Session(scenario, plant, events, clock, series)
        try:
            await session.run()
        finally:
            await events.close()
            session.clear_faults()
    controller = events.controller
    assert controller is not None
    samples, cycles = session.samples, session.cycles
    wall = time.perf_counter() - wall0
    limits = _limits(controller, served, scenario)
    model = cost_model(scenario, served)
    final = {d: b.soc for d, b in samples[-1].truth.batteries.items()} if samples else {}
    try:
        opt_cost, opt_status = perfect_foresight(
            scenario,
            controller=controller,
            series=series,
            first=first,
            final_soc=final,
            model=model,
        )
    except Exception as exc:  # a failed offline solve must not hide the run's own figures
        log.warning("perfect-foresight solve failed: %s", exc)
        opt_cost, opt_status = None, f"failed: {exc}"
    unsafe = unsafe_writes(samples, cycles)
    kpis = compute_kpis(
        scenario=scenario.name,
        samples=samples,
        cycles=cycles,
        limits=limits,
        model=model,
        wall_s=wall,
        optimum_cost=opt_cost,
        optimum_status=opt_status,
        faults=_fault_summary(
            scenario, cycles, unsafe, samples, [d.id for d in controller.batteries]
        ),
        events=event_summary(
            events, cycles=cycles, samples=samples, batteries=[d.id for d in controller.batteries]
        ),
        daemon_totals=_daemon_totals(controller),
    )
    return RunResult(
        scenario=scenario,
        kpis=kpis,
        failures=check_expectations(kpis, scenario),
        samples=samples,
        cycles=cycles,
        limits=limits,
        settings=served,
        currency=served.tariff.currency,
    )


class _SimulatedSitePlant:
    """hil_sim's :class:`~hil_sim.runner.SimulatedSite` seen through the :class:`Plant` seam."""

    def __init__(self, site: SimulatedSite) -> None:
        self._site = site

    @property
    def settings(self) -> Settings:
        """The settings pointing at the served devices."""
        return self._site.settings

    def truth(self) -> SiteTruth:
        """The simulator's true state now."""
        t = self._site.truth()
        return SiteTruth(
            time=t.time,
            load_w=t.load_w,
            pv_w=t.pv_w,
            pv_available_w=t.pv_available_w,
            grid_w=t.grid_w,
            batteries={
                d: BatteryTruth(
                    device_id=b.device_id,
                    soc=b.soc,
                    energy_wh=b.energy_wh,
                    capacity_wh=b.capacity_wh,
                    power_w=b.power_w,
                    commanded_w=b.commanded_w,
                    max_charge_w=b.max_charge_w,
                    max_discharge_w=b.max_discharge_w,
                    available=b.available,
                    alarm=b.alarm,
                )
                for d, b in t.batteries.items()
            },
        )

    def set_fault(self, fault: FaultSpec, active: bool) -> None:
        """Start or end a fault in the simulator."""
        self._site.set_fault(fault, active=active)


@contextlib.asynccontextmanager
async def _open_simulated_site(
    scenario: Scenario, settings: Settings, clock: SimClock, series: ScenarioSeries
) -> AsyncIterator[Plant]:
    tz = ZoneInfo(settings.site.timezone)
    site = SimulatedSite(
        settings,
        clock=clock,
        series=SiteSeries.load(series.path, tz),
        free_ports=True,
        initial_soc=dict(scenario.site.initial_soc),
        # Delay faults need a proxy in front of the device; the runner switches every fault.
        proxy=any(f.kind == "delay" for f in scenario.faults),
        export_limiter=scenario.site.export_limiter,
        source=str(scenario.source),
    )
    async with site:
        yield _SimulatedSitePlant(site)


def simulated_site_factory(
    scenario: Scenario, settings: Settings, clock: SimClock, series: ScenarioSeries
) -> AbstractAsyncContextManager[Plant]:
    """hil_sim's simulated site for ``scenario`` (the default plant)."""
    return _open_simulated_site(scenario, settings, clock, series)
