"""The controller: one site's cycles, in order, and the target of operator commands.

read -> snapshot -> forecast -> decide -> guard -> write -> publish. Each phase is named,
timed and runs in its own error boundary (the phases live beside this module); values leave
the core only as events on the bus.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo

from essd.clock import Clock, WallClockWatch
from essd.commands import CommandRejected
from essd.config import Settings
from essd.credibility import CredibilityMonitor, settings_for_site, soc_resolution
from essd.cycle import write
from essd.cycle.accounting import Accounting
from essd.cycle.decide import Decider, Manual, Mode, battery_specs
from essd.cycle.energy import forecast_record, net_load_w
from essd.cycle.forecasting import CycleForecast, measured_pv
from essd.cycle.guarding import GuardPhase, device_records
from essd.cycle.plan_codec import obj, optional_number, plan_data, plan_from_data
from essd.devices import ManagedDevice
from essd.dispatch import Dispatcher, FlexSpec
from essd.domain import BatteryReading, MeterReading, Plan, PlanCause, Snapshot
from essd.events import CycleCompleted, EventBus, SiteTotals
from essd.flexloads import FlexLoads
from essd.forecast import Forecast, Forecaster, Override
from essd.safety import DeviceEnvelope

log = logging.getLogger(__name__)


class Controller:
    """Runs control cycles for one site; also the target of operator commands."""

    def __init__(
        self,
        *,
        settings: Settings,
        devices: Sequence[ManagedDevice],
        forecaster: Forecaster,
        clock: Clock,
        bus: EventBus,
        dispatcher: Dispatcher | None = None,
        flex: FlexLoads | None = None,
    ) -> None:
        self.settings = settings
        self.flex = flex  # EV chargers or swap slots (essd.flexloads), planned with the batteries
        self.devices = {d.id: d for d in devices}
        self.slots = list(flex.devices) if flex is not None else []  # swap slots: not batteries
        self.batteries = [
            d for d in devices if not (d.is_meter or d.envelope is None or d in self.slots)
        ]
        meters = [d for d in devices if d.is_meter]
        self.meter = meters[0] if meters else None
        self.forecaster = forecaster
        self.clock = clock
        self.bus = bus
        ctl = settings.control
        self.specs = battery_specs(self.batteries, ctl.degradation_cost_per_kwh)
        self.dispatcher = dispatcher
        if self.dispatcher is None and (self.specs or flex is not None):
            self.dispatcher = Dispatcher(
                self.specs,
                ctl.horizon_steps,
                solver=ctl.solver,
                step_s=ctl.step_s,
                change_cost_per_kw=ctl.churn_penalty_per_kw,
                aggregate=ctl.aggregate_identical_units,
                clusters=ctl.aggregate_clusters,
                flex=FlexSpec(flex.columns) if flex is not None else None,
                setpoint_ttl_s=ctl.setpoint_ttl_s,
            )
        self.mode = Mode.AUTO
        self.reserve_override: float | None = None
        self._manual: dict[str, Manual] = {}
        self.cycle_no = 0
        self.overruns = 0
        tz, tariff = ZoneInfo(settings.site.timezone), settings.tariff
        self.accounting = Accounting(settings.demand_window_s, tz, tariff.carbon_price_per_kg)
        self._wall = WallClockWatch()
        self._phase_failures: set[tuple[str, str]] = set()
        # Overruns and solve deadlines exist only on clocks that run in real time.
        self._realtime = not bool(getattr(clock, "stepped", False))
        self.decider = Decider(
            settings=settings,
            batteries=self.batteries,
            specs=self.specs,
            dispatcher=self.dispatcher,
            envelope=self._envelope,
            peak_w=lambda: self.accounting.peak.peak_w,
            realtime=self._realtime,
            sessions=flex.sessions if flex is not None else None,
            billed_so_far=lambda s: self.accounting.billed_so_far(s, self._grid_power(s)),
        )
        self._forecast = CycleForecast(
            settings, forecaster, self._phase_failed, flex.drawn_w if flex is not None else None
        )
        self.credibility = CredibilityMonitor(
            settings_for_site(settings, [d.envelope for d in self.batteries if d.envelope]),
            {d.id: soc_resolution(d.profile) for d in self.batteries},
        )
        self._guard_phase = GuardPhase(
            credibility=self.credibility,
            batteries=self.batteries,
            cycle_period_s=ctl.cycle_period_s,
            setpoint_ttl_s=ctl.setpoint_ttl_s,
            import_limit_w=settings.site.grid_import_limit_w,
            export_limit_w=settings.site.grid_export_limit_w,
            on_failure=self._phase_failed,
            demand_charge=tariff.demand_charge_per_kw > 0,
        )

    @property
    def last_plan(self) -> Plan | None:
        """The last plan the optimizer solved (what rung 3 shifts)."""
        return self.decider.last_plan

    @property
    def totals(self) -> SiteTotals:
        """Energy, cost and carbon since the totals began (durable across restarts)."""
        return self.accounting.totals

    # --- operator commands (MQTT and CLI call these) ---------------------------------------

    def set_mode(self, mode: str) -> None:
        """Switch between auto, manual and standby."""
        if mode not in Mode.ALL:
            raise CommandRejected(f"mode: must be one of {', '.join(Mode.ALL)}")
        if mode != self.mode:
            log.info("mode %s -> %s", self.mode, mode)
        self.mode = mode
        if mode != Mode.MANUAL:
            self._manual.clear()

    def set_reserve(self, reserve_soc: float) -> None:
        """Set the reserve SoC ratio for every battery (below every max SoC)."""
        self._check_reserve(reserve_soc)
        self.reserve_override = reserve_soc

    def _check_reserve(self, reserve_soc: float) -> None:
        if not (math.isfinite(reserve_soc) and 0.0 <= reserve_soc <= 1.0):
            raise CommandRejected("reserve_soc: must be a ratio between 0 and 1")
        for d in self.batteries:
            if d.envelope is not None and reserve_soc >= d.envelope.max_soc:
                raise CommandRejected(
                    f"reserve_soc: must be below {d.id}'s max SoC {d.envelope.max_soc:g}"
                )

    def set_manual_setpoint(self, device_id: str, power_w: float, expires_at: float) -> None:
        """Command ``power_w`` (battery sign) for ``device_id`` until epoch ``expires_at``."""
        if self.mode != Mode.MANUAL:
            raise CommandRejected("mode: setpoints are accepted only in manual mode")
        if device_id not in {d.id for d in self.batteries}:
            raise CommandRejected(f"device: unknown battery {device_id!r}")
        if not math.isfinite(power_w):
            raise CommandRejected("power_w: must be finite")
        # Refuse, rather than silently clamp, what the device's static envelope cannot do.
        env = next(d.envelope for d in self.batteries if d.id == device_id)
        limit = None if env is None else env.max_discharge_w if power_w > 0 else env.max_charge_w
        if limit is not None and abs(power_w) > limit:
            raise CommandRejected(f"power_w: beyond {device_id}'s limit {limit:g} W")
        if expires_at <= self.clock.now():
            raise CommandRejected("expires_at: already in the past")
        self._manual[device_id] = Manual(power_w, expires_at)

    def set_price_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float]
    ) -> None:
        """Override a price series (import_price or export_price) until it ends."""
        if quantity not in ("import_price", "export_price", "carbon_g_per_kwh"):
            raise CommandRejected(f"quantity: not a price series: {quantity!r}")
        self.forecaster.set_override(quantity, Override(start, step_s, tuple(values)))

    def set_forecast_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float]
    ) -> None:
        """Override a forecast series (load_w or pv_w) until it ends."""
        if quantity not in ("load_w", "pv_w"):
            raise CommandRejected(f"quantity: not a forecast series: {quantity!r}")
        self.forecaster.set_override(quantity, Override(start, step_s, tuple(values)))

    def set_session_request(self, charger: str, *request: float | None) -> None:
        """``cmd/session`` (essd.commands.SessionTarget): departure, energy, SoC, capacity."""
        if self.flex is None:
            raise CommandRejected("command: this site has no chargers")
        self.flex.request(charger, *request)

    # --- durable state ---------------------------------------------------------------------

    def durable_state(self) -> dict[str, Any]:
        """What must survive a restart, as JSON-ready data (see :mod:`essd.state`)."""
        last = self.decider.last_plan
        return {
            **self.accounting.state(),
            "forecaster": self.forecaster.state(),
            "mode": self.mode,
            "reserve_override": self.reserve_override,
            "last_plan": None if last is None else plan_data(last),
            **(self.flex.durable() if self.flex is not None else {"departures": None}),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back :meth:`durable_state`: all of it or nothing.

        Raises ValueError naming the field when any part does not fit this site; nothing is
        changed then. A restored mode or reserve that this site refuses is an error too.
        """
        totals, peak, unit_wh = self.accounting.parse(data)
        mode = data.get("mode", Mode.AUTO)
        if mode not in Mode.ALL:
            raise ValueError(f"mode: must be one of {', '.join(Mode.ALL)}")
        reserve = optional_number(data, "reserve_override")
        if reserve is not None:
            self._check_reserve(reserve)
        plan = None if data.get("last_plan") is None else plan_from_data(obj(data, "last_plan"))
        learned = self.flex.parse_state(data) if self.flex is not None else None
        self.forecaster.restore(data.get("forecaster"))  # the last check: all or nothing
        self.accounting.totals, self.accounting.peak, self.mode = totals, peak, mode
        self.accounting.unit_wh = unit_wh
        self.reserve_override = reserve
        if learned is not None:
            learned()
        if plan is not None and set(plan.device_ids) == {d.id for d in self.batteries}:
            self.decider.last_plan = plan

    # --- the cycle -------------------------------------------------------------------------

    async def run_cycle(self) -> CycleCompleted:
        """Run one full cycle and publish it; never raises.

        Each phase runs in its own error boundary (OpenEMS's cycle worker is the model): an
        exception or an invalid value in forecast, decide or guard gives a typed cause and a
        lower rung, and write and publish still run. ``phase_errors`` of the published record
        names every phase that failed.
        """
        phase: dict[str, float] = {}
        errors: dict[str, str] = {}
        started = time.perf_counter()
        now = self.clock.now()
        mono = self.clock.monotonic()
        wall_step = self._wall.observe(now, mono)
        standby = self.mode == Mode.STANDBY
        ctl = self.settings.control

        t = time.perf_counter()
        await self._read_phase(standby, errors)
        phase["read"] = time.perf_counter() - t

        t = time.perf_counter()
        snapshot, grid = self._snapshot_phase(now, mono, errors)
        phase["snapshot"] = time.perf_counter() - t

        t = time.perf_counter()
        forecast, forecast_cause, detail = self._forecast(now, snapshot, grid)
        if forecast_cause is not None:
            errors["forecast"] = detail
        phase["forecast"] = time.perf_counter() - t

        t = time.perf_counter()
        plan, desired, source = await self._decide_phase(
            now,
            snapshot,
            forecast,
            forecast_cause=forecast_cause,
            detail=detail,
            errors=errors,
        )
        phase["decide"] = time.perf_counter() - t

        t = time.perf_counter()
        envelopes = {d.id: self._envelope(d) for d in self.batteries}
        result, plan, credibility = self._guard_phase(
            snapshot,
            envelopes,
            desired,
            plan,
            grid=grid,
            source=source,
            mono=mono,
            standby=standby,
            errors=errors,
            peak_w=self.accounting.peak.peak_w,
        )
        phase["guard"] = time.perf_counter() - t

        # The batteries' new setpoints move the grid too: the chargers get what is left.
        after = max(grid, result.predicted_grid_w or grid) if grid is not None else None
        self._chargers_phase(plan, None if standby else after, errors)

        t = time.perf_counter()
        slot_sp = self.flex.setpoints(mono, ctl.setpoint_ttl_s) if self.flex is not None else {}
        setpoints = {**result.setpoints, **slot_sp}  # swap slots' limits (never raises)
        units = [*self.batteries, *self.slots]
        outcomes = await write.write_all(
            units,
            setpoints,
            standby=standby,
            on_failure=self._phase_failed,
            refresh_slots=(self.cycle_no, ctl.cycle_period_s),
        )
        phase["write"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            self.accounting.integrate(now, mono, grid, snapshot, forecast)
        except Exception as exc:
            errors["publish"] = self._phase_failed("publish", exc)
        self.cycle_no += 1
        duration = time.perf_counter() - started
        # Only a clock running in (a multiple of) real time can overrun; a stepped one waits.
        overrun = self._realtime and duration > ctl.cycle_period_s / self.clock.speed
        if overrun:
            self.overruns += 1
        records = device_records(
            self.batteries,
            snapshot=snapshot,
            envelopes=envelopes,
            desired=desired,
            result=result,
            outcomes=outcomes,
            mono=mono,
            credibility=credibility,
            unit_wh=self.accounting.unit_wh,
        )
        health = self.dispatcher.health if self.dispatcher is not None else None
        phase["publish"] = time.perf_counter() - t
        event = CycleCompleted(
            cycle=self.cycle_no,
            time=now,
            duration_s=time.perf_counter() - started,
            period_s=ctl.cycle_period_s,
            overrun=overrun,
            overruns_total=self.overruns,
            phase_s=phase,
            snapshot=snapshot,
            plan=plan,
            setpoints=result.setpoints,
            device_states={d.id: d.state for d in self.devices.values()},
            device_counters={d.id: d.frozen_counters() for d in self.devices.values()},
            grid_power_w=grid,
            import_limit_w=self.settings.site.grid_import_limit_w,
            export_limit_w=self.settings.site.grid_export_limit_w,
            import_price=float(forecast.import_price[0]),
            export_price=float(forecast.export_price[0]),
            carbon_intensity_g_per_kwh=float(forecast.carbon_g_per_kwh[0]),
            totals=self.accounting.totals,
            mode=self.mode,
            reserve_soc=self._reserve(),
            devices=records,
            predicted_grid_w=result.predicted_grid_w,
            site_limit_unmet_w=result.site_limit_unmet_w,
            phase_errors=errors,
            wall_step_s=wall_step,
            solver_failures_consecutive=health.solver_failures_consecutive if health else 0,
            solver_rebuilds_total=health.solver_rebuilds_total if health else 0,
            credibility=credibility,
            pv_power_w=measured_pv(snapshot),
            net_load_w=net_load_w(snapshot, grid),
            billing_peak_w=self.accounting.peak.peak_w,
            forecast=forecast_record(forecast, plan.steps or ctl.horizon_steps),
            charger_limits_w=dict(self.flex.last_limits_w) if self.flex is not None else {},
            swap=self.flex.status(now) if self.flex is not None else None,
        )
        return self._publish(event)

    async def _read_phase(self, standby: bool, errors: dict[str, str]) -> None:
        """Read every device concurrently, each within its own timeout."""
        try:
            await asyncio.gather(*(d.read(mode_safe=standby) for d in self.devices.values()))
        except Exception as exc:  # ManagedDevice.read never raises; be safe if it does
            errors["read"] = self._phase_failed("read", exc)

    def _snapshot_phase(
        self, now: float, mono: float, errors: dict[str, str]
    ) -> tuple[Snapshot, float | None]:
        """The frozen process image and the meter's grid power (None: limits unverifiable)."""
        try:
            snapshot = self._snapshot(now)
            return snapshot, self._grid_power(snapshot)
        except Exception as exc:
            errors["snapshot"] = self._phase_failed("snapshot", exc)
            return Snapshot(time=now, mono=mono, batteries={}, meter=None), None

    def _chargers_phase(self, plan: Plan, grid: float | None, errors: dict[str, str]) -> None:
        """EV chargers' limits, own error boundary; ``grid`` None (no meter, standby): pause."""
        try:
            if self.flex is not None:
                self.flex.apply(plan, None if grid is None else grid - self.flex.drawn_w())
        except Exception as exc:
            errors["chargers"] = self._phase_failed("chargers", exc)

    async def _decide_phase(
        self,
        now: float,
        snapshot: Snapshot,
        forecast: Forecast,
        *,
        forecast_cause: PlanCause | None,
        detail: str,
        errors: dict[str, str],
    ) -> tuple[Plan, dict[str, float], str]:
        """The plan and each unit's requested power; a failure descends the ladder."""
        try:
            plan, desired, source = await self.decider.decide(
                now,
                snapshot,
                forecast,
                mode=self.mode,
                manual=self._manual,
                forecast_cause=forecast_cause,
                detail=detail,
            )
        except Exception as exc:
            errors["decide"] = self._phase_failed("decide", exc)
            plan = self.decider.descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.DECIDE_FAILED,
                reason=f"decide failed: {exc}",
            )
            desired, source = self.decider.first_steps(plan), f"rung{int(plan.rung)}"
        if not all(math.isfinite(v) for v in desired.values()):
            errors.setdefault("decide", "non-finite setpoint requested")
            plan = self.decider.descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.PLAN_INVALID,
                reason="non-finite setpoint requested",
                allow_last_plan=False,
            )
            desired, source = self.decider.first_steps(plan), f"rung{int(plan.rung)}"
        if not plan.import_price:
            n = plan.steps
            plan = replace(
                plan,
                import_price=tuple(forecast.import_price[:n].tolist()),
                export_price=tuple(forecast.export_price[:n].tolist()),
            )
        return plan, desired, source

    def _publish(self, event: CycleCompleted) -> CycleCompleted:
        """Publish the cycle's record, then start what it left for between cycles."""
        self.bus.publish(event)
        self.decider.start_between()
        return event

    def _phase_failed(self, name: str, exc: BaseException) -> str:
        """Log a phase's failure once per kind (not every cycle) and return its text."""
        text = f"{type(exc).__name__}: {exc}"
        key = (name, type(exc).__name__)
        if key not in self._phase_failures:
            self._phase_failures.add(key)
            log.error("%s phase failed (the cycle goes on, lower rung): %s", name, text)
        return text

    def _reserve(self) -> float:
        base = self.settings.control.reserve_soc
        return base if self.reserve_override is None else self.reserve_override

    def _envelope(self, d: ManagedDevice) -> DeviceEnvelope:
        env = d.envelope
        assert env is not None
        if self.reserve_override is None:
            return env
        reserve = max(self.reserve_override, d.config.reserve_soc or 0.0)
        return replace(env, reserve_soc=min(reserve, env.max_soc - 1e-3))

    def _snapshot(self, now: float) -> Snapshot:
        batteries = {d.id: d.last for d in self.batteries if isinstance(d.last, BatteryReading)}
        meter = self.meter.last if self.meter is not None else None
        return Snapshot(
            time=now,
            mono=self.clock.monotonic(),
            batteries=batteries,
            meter=meter if isinstance(meter, MeterReading) else None,
        )

    def _grid_power(self, snapshot: Snapshot) -> float | None:
        """The meter's grid power when fresh and valid, else None (limits unverifiable)."""
        if self.meter is None or snapshot.meter is None or not self.meter.healthy:
            return None
        r = snapshot.meter.grid_power_w
        return r.value if r.valid else None

    async def safe_stop(self, timeout_s: float = 5.0) -> dict[str, bool]:
        """Write safe mode to every storage unit concurrently within ``timeout_s`` (real s)."""
        return await write.safe_stop([*self.batteries, *self.slots], timeout_s)
