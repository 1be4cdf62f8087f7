"""Run a scenario: the real control core against a simulated site, on a stepped clock.

The daemon core (:func:`essd.daemon.build_controller`: real drivers, real Modbus over
loopback, the real optimizer and safety supervisor) runs one cycle per ``cycle_period``; the
clock is advanced by hand between cycles, in sub-steps of at most a minute, and the plant's
true state is sampled at each sub-step. Faults start and clear on the timeline at sub-step
boundaries. After the run the same site is solved offline with perfect knowledge of the true
series (the optimizer's own LP over the whole scenario) to say how much of the achievable
saving the daemon took.

Battery W > 0 discharges into the site; grid W > 0 imports.

The true series are :mod:`essd.hil.truth`, the offline optimum :mod:`essd.hil.foresight`, the
checks :mod:`essd.hil.expectations`; the simulated site is reached through :class:`Plant`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import Settings
from essd.cycle import Controller
from essd.daemon import build_controller
from essd.events import CycleCompleted, EventBus
from essd.hil.expectations import check_expectations, fault_summary, report_window
from essd.hil.foresight import cost_model, perfect_foresight
from essd.hil.hostile import DaemonClock, EventDriver, event_summary, mqtt_limits
from essd.hil.kpi import CycleRecord, Kpis, Sample, compute_kpis, unsafe_writes
from essd.hil.scenario import Scenario, site_mqtt
from essd.hil.truth import ScenarioSeries
from hil_sim.faults import INSTANT_KINDS, FaultSpec
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries
from hil_sim.truth import Limits, SiteTruth

log = logging.getLogger(__name__)


SUBSTEP_S = 60.0


class Plant(Protocol):
    """The seam between the runner and the simulator: what the runner needs from a simulated
    site. Its *true* state is the simulator's, not the daemon's belief. hil_sim's SimulatedSite
    is one (:func:`simulated_site_factory`); a test may pass any other to :func:`run_scenario`.
    """

    @property
    def settings(self) -> Settings:
        """The site settings with every transport pointing at the served devices."""
        ...

    def truth(self) -> SiteTruth:
        """Advance to the clock's now and return the true state."""
        ...

    def set_fault(self, fault: FaultSpec, active: bool) -> None:
        """Start or clear one fault of the timeline."""
        ...


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
        import_w=settings.site.grid_import_limit_w if imp is None else imp,
        export_w=settings.site.grid_export_limit_w if exp is None else exp,
        site_tolerance_w=scenario.expect.site_limit_tolerance_w,
        commanded=frozenset(k for k, e in envs.items() if e.can_discharge),
    )


def _daemon_totals(controller: Controller) -> dict[str, float]:
    """The totals and billing peak essd itself kept (its durable state), to set against the
    truth: a wall-clock step must add or remove nothing."""
    state = controller.durable_state()
    totals = {f"{k}": float(v) for k, v in state["totals"].items()}
    totals["billing_peak_w"] = float(state["peak"]["peak_w"])
    return totals


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
    limits = _limits(controller, served, scenario)
    model = cost_model(scenario, served)
    final = {d: b.soc for d, b in samples[-1].truth.batteries.items()} if samples else {}
    initial = {d: b.soc for d, b in first.batteries.items()}
    opt_end: float | None = None
    try:
        # The optimum from the same start back to the same SoC (the yardstick), and re-solved
        # to where the run ended (what the run's change of stored energy was worth).
        solve = functools.partial(
            perfect_foresight, scenario, controller=controller, series=series, first=first
        )
        opt_cost, opt_status = solve(final_soc=initial, model=model)
        opt_end, _ = solve(final_soc=final, model=model)
    except Exception as exc:  # a failed offline solve must not hide the run's own figures
        log.warning("perfect-foresight solve failed: %s", exc)
        opt_cost, opt_status = None, f"failed: {exc}"
    unsafe = unsafe_writes(samples, cycles)
    # The one wall time of a run (the CLI, kpis.json and the report all show it): from the
    # start to the figures, the perfect-foresight solve included.
    wall = time.perf_counter() - wall0
    kpis = compute_kpis(
        scenario=scenario.name,
        samples=samples,
        cycles=cycles,
        limits=limits,
        model=model,
        wall_s=wall,
        optimum_cost=opt_cost,
        optimum_cost_to_end_soc=opt_end,
        optimum_status=opt_status,
        faults=fault_summary(
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


@contextlib.asynccontextmanager
async def simulated_site_factory(
    scenario: Scenario, settings: Settings, clock: SimClock, series: ScenarioSeries
) -> AsyncIterator[Plant]:
    """hil_sim's simulated site for ``scenario`` (the default plant)."""
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
        yield site
