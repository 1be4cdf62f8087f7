"""The control cycle: read -> snapshot -> forecast -> decide -> guard -> write -> publish.

Each phase is named and timed. Reads of all devices run concurrently, each within its own
timeout. The optimizer runs in a worker thread under a time budget, so a slow solve never
stalls reads, writes or the watchdog: a solve still running when the budget ends is left to
finish in its thread, and the cycle falls back (last plan shifted, else rule-based). Writes
happen last, only for setpoints the safety supervisor produced. Values leave the core only as
events on the bus.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid W > 0 imports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, get_args
from zoneinfo import ZoneInfo

import numpy as np

from essd.clock import Clock
from essd.commands import CommandRejected
from essd.commands import Mode as WireMode
from essd.config import Settings
from essd.credibility import (
    CredibilityMonitor,
    CredibilityReport,
    settings_for_site,
    soc_resolution,
)
from essd.devices import ManagedDevice
from essd.dispatch import (
    BatterySpec,
    Dispatcher,
    DispatchInputs,
    InvalidDispatchInputsError,
    rule_based_plan,
    safe_idle_plan,
)
from essd.domain import (
    BatteryReading,
    DeviceState,
    FallbackRung,
    LiveLimits,
    MeterReading,
    Plan,
    PlanCause,
    Setpoint,
    Snapshot,
)
from essd.events import (
    CycleCompleted,
    DeviceLimits,
    DeviceRecord,
    EventBus,
    SiteTotals,
    WriteOutcome,
    WriteStatus,
)
from essd.forecast import (
    Forecast,
    Forecaster,
    Override,
    billing_period_start,
    tariff_import_price,
)
from essd.ladder import SOLVED, descend
from essd.safety import DeviceEnvelope, GuardInput, GuardResult, guard
from essd.site_energy import forecast_record, measured_pv_w, net_load_w, step_cost

__all__ = ["CommandRejected", "Controller", "Mode", "WallClockWatch"]

log = logging.getLogger(__name__)

# On a stepped clock the solve is awaited whatever it takes (see Controller._solve).
_STEPPED_SOLVE_BUDGET_S = 3600.0
# Longest interval integrated into the totals at once: a gap longer than this (the process
# was stopped, the host suspended) is not energy essd saw.
_MAX_INTEGRATION_S = 900.0
# A wall-clock jump larger than this (s) against the monotonic clock is a step, not drift.
WALL_STEP_THRESHOLD_S = 2.0


class Mode:
    """Operating modes: names for the values of :data:`essd.commands.Mode` (the wire contract)."""

    AUTO = "auto"
    MANUAL = "manual"
    STANDBY = "standby"
    ALL: tuple[str, ...] = get_args(WireMode)


@dataclass(frozen=True, slots=True)
class _Manual:
    power_w: float
    expires_at: float  # epoch seconds


class _PeakTracker:
    """The billing period's running peak of the per-step average grid import (demand charge)."""

    def __init__(self, step_s: float, tz: ZoneInfo) -> None:
        self._step_s = step_s
        self._tz = tz
        self.peak_w = 0.0
        self._window_start: float | None = None
        self._wh = 0.0
        self._period: float | None = None

    def state(self) -> dict[str, Any]:
        """The tracker as plain data for the durable state."""
        return {
            "period": self._period,
            "peak_w": self.peak_w,
            "window_start": self._window_start,
            "window_wh": self._wh,
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""
        period = _optional_number(data, "period")
        window = _optional_number(data, "window_start")
        peak = _number(data, "peak_w")
        wh = _number(data, "window_wh")
        if peak < 0 or wh < 0:
            raise ValueError("peak_w, window_wh: must be >= 0")
        self._period, self._window_start, self.peak_w, self._wh = period, window, peak, wh

    def add(self, t: float, grid_w: float, dt_s: float) -> None:
        period = billing_period_start(t, self._tz)
        if period != self._period:
            self._period, self.peak_w = period, 0.0
        window = t - (t % self._step_s)
        if window != self._window_start:
            if self._window_start is not None:
                self.peak_w = max(self.peak_w, self._wh * 3600.0 / self._step_s)
            self._window_start, self._wh = window, 0.0
        self._wh += max(0.0, grid_w) * dt_s / 3600.0


class WallClockWatch:
    """Detects steps of the wall clock against the monotonic one (NTP, an operator, RTC).

    Control schedules and integrates on the monotonic clock only; the wall clock names the
    hour, the day and the billing period. A step is logged once when it happens.
    """

    def __init__(self, threshold_s: float = WALL_STEP_THRESHOLD_S) -> None:
        self._threshold_s = threshold_s
        self._last: tuple[float, float] | None = None
        self.steps = 0

    def observe(self, now: float, mono: float) -> float:
        """The wall-clock step (s, + forward) since the last call; 0.0 when there was none."""
        last, self._last = self._last, (now, mono)
        if last is None:
            return 0.0
        step = (now - last[0]) - (mono - last[1])
        if abs(step) <= self._threshold_s:
            return 0.0
        self.steps += 1
        log.warning(
            "wall clock stepped by %+.0f s; control runs on the monotonic clock, totals and "
            "the billing peak are integrated on it",
            step,
        )
        return step


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
    ) -> None:
        self.settings = settings
        self.devices = {d.id: d for d in devices}
        self.batteries = [d for d in devices if not d.is_meter and d.envelope is not None]
        meters = [d for d in devices if d.is_meter]
        self.meter = meters[0] if meters else None
        self.forecaster = forecaster
        self.clock = clock
        self.bus = bus
        ctl = settings.control
        self.specs = [
            BatterySpec(
                id=d.id,
                capacity_wh=d.envelope.capacity_wh,
                charge_efficiency=d.envelope.charge_efficiency,
                discharge_efficiency=d.envelope.discharge_efficiency,
                degradation_cost_per_kwh=(
                    d.config.degradation_cost_per_kwh
                    if d.config.degradation_cost_per_kwh is not None
                    else ctl.degradation_cost_per_kwh
                ),
                can_discharge=d.envelope.can_discharge,
            )
            for d in self.batteries
            if d.envelope is not None
        ]
        self.dispatcher = dispatcher
        if self.dispatcher is None and self.specs:
            self.dispatcher = Dispatcher(
                self.specs,
                ctl.horizon_steps,
                solver=ctl.solver,
                step_s=ctl.step_s,
                change_cost_per_kw=ctl.churn_penalty_per_kw,
            )
        self.mode = Mode.AUTO
        self.reserve_override: float | None = None
        self._manual: dict[str, _Manual] = {}
        self.cycle_no = 0
        self.overruns = 0
        self.last_plan: Plan | None = None
        self._solving: Future[Plan] | asyncio.Future[Plan] | None = None
        self._totals = SiteTotals()
        self._unit_wh: dict[str, tuple[float, float]] = {}  # id -> (charged, discharged)
        self._last_mono: float | None = None
        tz = ZoneInfo(settings.site.timezone)
        self._peak_tz = tz
        self._peak = _PeakTracker(ctl.step_s, tz)
        self._wall = WallClockWatch()
        self._phase_failures: set[tuple[str, str]] = set()
        # Overruns and solve deadlines exist only on clocks that run in real time.
        self._realtime = not bool(getattr(clock, "stepped", False))
        self.credibility = CredibilityMonitor(
            settings_for_site(settings, [d.envelope for d in self.batteries if d.envelope]),
            {d.id: soc_resolution(d.profile) for d in self.batteries},
        )

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
        self._manual[device_id] = _Manual(power_w, expires_at)

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

    # --- durable state ---------------------------------------------------------------------

    def durable_state(self) -> dict[str, Any]:
        """What must survive a restart, as JSON-ready data (see :mod:`essd.state`)."""
        return {
            "totals": dataclasses.asdict(self._totals),
            "unit_wh": {k: list(v) for k, v in self._unit_wh.items()},
            "peak": self._peak.state(),
            "forecaster": self.forecaster.state(),
            "mode": self.mode,
            "reserve_override": self.reserve_override,
            "last_plan": None if self.last_plan is None else _plan_data(self.last_plan),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back :meth:`durable_state`: all of it or nothing.

        Raises ValueError naming the field when any part does not fit this site; nothing is
        changed then. A restored mode or reserve that this site refuses is an error too.
        """
        totals = _object(data, "totals")
        fields = {f.name for f in dataclasses.fields(SiteTotals)}
        if set(totals) - fields:
            raise ValueError(f"totals: keys must be from {sorted(fields)}")
        values = {k: _number(totals, k) for k in totals}
        if any(v < 0 for k, v in values.items() if k not in ("cost", "savings")):
            raise ValueError("totals: energy and carbon totals must be >= 0")
        peak = _PeakTracker(self.settings.control.step_s, self._peak_tz)
        peak.restore(_object(data, "peak"))
        mode = data.get("mode", Mode.AUTO)
        if mode not in Mode.ALL:
            raise ValueError(f"mode: must be one of {', '.join(Mode.ALL)}")
        reserve = _optional_number(data, "reserve_override")
        if reserve is not None:
            self._check_reserve(reserve)
        unit_wh = _unit_energy(data.get("unit_wh", {}))
        plan_data = data.get("last_plan")
        plan = None if plan_data is None else _plan_from_data(_object(data, "last_plan"))
        self.forecaster.restore(data.get("forecaster"))  # the last check: all or nothing
        self._totals, self._peak, self.mode = SiteTotals(**values), peak, mode
        self._unit_wh = unit_wh
        self.reserve_override = reserve
        if plan is not None and set(plan.device_ids) == {d.id for d in self.batteries}:
            self.last_plan = plan

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
        )
        phase["guard"] = time.perf_counter() - t

        t = time.perf_counter()
        outcomes = await self._write(result.setpoints, standby=standby)
        phase["write"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            self._integrate(now, mono, grid, snapshot, forecast)
        except Exception as exc:
            errors["publish"] = self._phase_failed("publish", exc)
        self.cycle_no += 1
        duration = time.perf_counter() - started
        # Only a clock that runs in real time (or a multiple of it) can overrun: a stepped
        # clock waits for the cycle, whatever the host's speed.
        overrun = self._realtime and duration > ctl.cycle_period_s / self.clock.speed
        if overrun:
            self.overruns += 1
        records = self._records(
            snapshot=snapshot,
            envelopes=envelopes,
            desired=desired,
            result=result,
            outcomes=outcomes,
            mono=mono,
            credibility=credibility,
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
            totals=self._totals,
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
            pv_power_w=measured_pv_w(snapshot),
            net_load_w=net_load_w(snapshot, grid),
            billing_peak_w=self._peak.peak_w,
            forecast=forecast_record(forecast, plan.steps or ctl.horizon_steps),
        )
        self.bus.publish(event)
        return event

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
            plan, desired, source = await self._decide(
                now, snapshot, forecast, forecast_cause=forecast_cause, detail=detail
            )
        except Exception as exc:
            errors["decide"] = self._phase_failed("decide", exc)
            plan = self._descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.DECIDE_FAILED,
                reason=f"decide failed: {exc}",
            )
            desired, source = self._first_steps(plan), f"rung{int(plan.rung)}"
        if not all(math.isfinite(v) for v in desired.values()):
            errors.setdefault("decide", "non-finite setpoint requested")
            plan = self._descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.PLAN_INVALID,
                reason="non-finite setpoint requested",
                allow_last_plan=False,
            )
            desired, source = self._first_steps(plan), f"rung{int(plan.rung)}"
        if not plan.import_price:
            n = plan.steps
            plan = replace(
                plan,
                import_price=tuple(forecast.import_price[:n].tolist()),
                export_price=tuple(forecast.export_price[:n].tolist()),
            )
        return plan, desired, source

    def _guard_phase(
        self,
        snapshot: Snapshot,
        envelopes: Mapping[str, DeviceEnvelope],
        desired: Mapping[str, float],
        plan: Plan,
        *,
        grid: float | None,
        source: str,
        mono: float,
        standby: bool,
        errors: dict[str, str],
    ) -> tuple[GuardResult, Plan, CredibilityReport | None]:
        """Safe setpoints from the requests, after the credibility screen decided what the
        guard may believe of each unit and of the meter; a failing guard idles every unit."""
        ctl = self.settings.control
        report: CredibilityReport | None = None
        try:
            screened = self.credibility.screen(
                GuardInput(
                    now_mono=mono,
                    dt_s=ctl.cycle_period_s,
                    ttl_s=ctl.setpoint_ttl_s,
                    envelopes=envelopes,
                    readings=snapshot.batteries,
                    healthy={d.id: d.healthy and not standby for d in self.batteries},
                    desired_w=desired,
                    previous_w={
                        d.id: d.written.power_w if d.written else 0.0 for d in self.batteries
                    },
                    grid_power_w=grid,
                    import_limit_w=self.settings.site.grid_import_limit_w,
                    export_limit_w=self.settings.site.grid_export_limit_w,
                    source=source,
                ),
                # What each unit was last told and accepted (a unit whose writes fail goes on
                # with that); None where essd commands nothing (safe mode, not answering).
                commanded_w={d.id: _commanded(d) for d in self.batteries},
            )
            report = screened.report
            result = guard(screened.guard_input)
            if not all(math.isfinite(sp.power_w) for sp in result.setpoints.values()):
                raise ValueError("guard produced a non-finite setpoint")
        except Exception as exc:
            errors["guard"] = self._phase_failed("guard", exc)
            result = _idle_result(self.batteries, mono, ctl.setpoint_ttl_s)
            plan = plan.with_cause(
                FallbackRung.SAFE_IDLE, PlanCause.GUARD_FAILED, f"guard failed: {exc}; safe idle"
            )
        if self.batteries and plan.rung < FallbackRung.SAFE_IDLE:
            # The guard idled every battery: say so, whatever the optimizer had planned.
            meter = report.meter if report is not None else None
            if grid is None:
                plan = plan.with_cause(
                    FallbackRung.SAFE_IDLE,
                    PlanCause.STALE_DATA,
                    "no valid meter reading: every battery idles until it returns",
                )
            elif meter is not None and not meter.plausible:
                plan = plan.with_cause(
                    FallbackRung.SAFE_IDLE,
                    PlanCause.METER_IMPLAUSIBLE,
                    f"meter {meter.cause}: {meter.detail}: every battery idles until it returns",
                )
        return result, plan, report

    def _phase_failed(self, name: str, exc: BaseException) -> str:
        """Log a phase's failure once per kind (not every cycle) and return its text."""
        text = f"{type(exc).__name__}: {exc}"
        key = (name, type(exc).__name__)
        if key not in self._phase_failures:
            self._phase_failures.add(key)
            log.error("%s phase failed (the cycle goes on, lower rung): %s", name, text)
        return text

    def _records(
        self,
        *,
        snapshot: Snapshot,
        envelopes: Mapping[str, DeviceEnvelope],
        desired: Mapping[str, float],
        result: GuardResult,
        outcomes: Mapping[str, WriteOutcome],
        mono: float,
        credibility: CredibilityReport | None,
    ) -> dict[str, DeviceRecord]:
        records: dict[str, DeviceRecord] = {}
        for d in self.batteries:
            env = envelopes[d.id]
            reading = snapshot.batteries.get(d.id)
            live = _live_limits(env, reading)
            sp = result.setpoints.get(d.id)
            outcome = outcomes.get(d.id) or d.outcome(WriteStatus.SKIPPED)
            accepted = outcome.accepted_at_mono
            verdict = credibility.units.get(d.id) if credibility is not None else None
            records[d.id] = DeviceRecord(
                device_id=d.id,
                device_class=d.profile.device_class,
                state=d.state,
                reason=d.reason,
                limits=DeviceLimits(
                    reserve_soc=env.reserve_soc,
                    max_soc=env.max_soc,
                    max_charge_w=live.max_charge_w,
                    max_discharge_w=live.max_discharge_w,
                ),
                requested_w=float(desired.get(d.id, 0.0)),
                setpoint_w=sp.power_w if sp is not None else 0.0,
                guard_reasons=tuple(result.reasons.get(d.id, ())),
                write=outcome,
                setpoint_age_s=None if accepted is None else max(0.0, mono - accepted),
                charged_wh=self._unit_wh.get(d.id, (0.0, 0.0))[0],
                discharged_wh=self._unit_wh.get(d.id, (0.0, 0.0))[1],
                credible=verdict is None or verdict.credible,
                credibility=""
                if verdict is None or verdict.credible
                else f"{verdict.cause}: {verdict.detail}",
            )
        return records

    def _first_steps(self, plan: Plan) -> dict[str, float]:
        return {
            d.id: plan.first_step_w(d.id) if d.id in plan.power_w else 0.0 for d in self.batteries
        }

    def _forecast(
        self, now: float, snapshot: Snapshot, grid: float | None
    ) -> tuple[Forecast, PlanCause | None, str]:
        """The horizon's forecast, never raising: a failed forecaster gives a persistence
        forecast of the measured net load, and non-finite values are replaced by safe ones;
        either way the cause is returned so the cycle plans on a lower rung."""
        ctl = self.settings.control
        net = None
        if grid is not None:
            net = grid + sum(
                r.power_w.value or 0.0 for r in snapshot.batteries.values() if r.power_w.valid
            )
        try:
            if net is not None:
                self.forecaster.observe(now, net, measured_pv_w(snapshot))
            forecast = self.forecaster.forecast(now, ctl.step_s, ctl.horizon_steps)
        except Exception as exc:
            detail = self._phase_failed("forecast", exc)
            return self._persistence(now, net), PlanCause.FORECAST_FAILED, detail
        # The safe stand-in (96 tariff lookups) is built only when a value needs replacing.
        clean, bad = _sanitize(forecast, lambda: self._persistence(now, net))
        if bad:
            detail = f"non-finite or negative forecast values in {', '.join(bad)}"
            self._phase_failed("forecast", ValueError(detail))
            return clean, PlanCause.FORECAST_INVALID, detail
        return forecast, None, ""

    def _persistence(self, now: float, net: float | None) -> Forecast:
        """A forecast that needs nothing but the present: net load held, tariff prices."""
        ctl = self.settings.control
        n = ctl.horizon_steps
        times = now + ctl.step_s * np.arange(n, dtype=np.float64)
        tz = ZoneInfo(self.settings.site.timezone)
        try:
            imp = np.array(
                [
                    tariff_import_price(self.settings.tariff, datetime.fromtimestamp(float(x), tz))
                    for x in times
                ]
            )
        except Exception:  # a tariff that cannot be evaluated prices nothing
            imp = np.zeros(n)
        exp = np.full(n, self.settings.tariff.export_price_per_kwh)
        return Forecast(
            start=now,
            step_s=ctl.step_s,
            load_w=np.full(n, 0.0 if net is None or not math.isfinite(net) else net),
            pv_w=np.zeros(n),
            import_price=np.where(np.isfinite(imp), imp, 0.0),
            export_price=np.minimum(np.where(np.isfinite(exp), exp, 0.0), imp),
            carbon_g_per_kwh=np.full(n, self.settings.forecast.carbon_intensity_g_per_kwh),
        )

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

    async def _decide(
        self,
        now: float,
        snapshot: Snapshot,
        forecast: Forecast,
        *,
        forecast_cause: PlanCause | None,
        detail: str,
    ) -> tuple[Plan, dict[str, float], str]:
        ids = [d.id for d in self.batteries]
        if self.mode == Mode.STANDBY:
            plan = self._idle(now, PlanCause.STANDBY, "standby")
            return plan, dict.fromkeys(ids, 0.0), "standby"
        if self.mode == Mode.MANUAL:
            desired = {}
            for dev_id in ids:
                m = self._manual.get(dev_id)
                desired[dev_id] = m.power_w if m is not None and m.expires_at > now else 0.0
            return self._idle(now, PlanCause.MANUAL, "manual"), desired, "manual"
        if self.dispatcher is None:
            plan = self._idle(now, PlanCause.NO_BATTERY, "no battery to dispatch")
            return plan, dict.fromkeys(ids, 0.0), "safe"
        if forecast_cause is not None:
            plan = self._descend(now, snapshot, forecast, cause=forecast_cause, reason=detail)
            self._remember(plan)
            return plan, self._first_steps(plan), f"rung{int(plan.rung)}"
        try:
            # Validated here, on the event loop: a solver thread never sees bad inputs.
            inputs = self._inputs(now, snapshot, forecast)
            self.dispatcher.validate(inputs)
        except InvalidDispatchInputsError as exc:
            plan = self._descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.INVALID_INPUTS,
                reason=f"invalid inputs: {exc}",
                allow_last_plan=False,
            )
            return plan, self._first_steps(plan), "safe"
        plan = await self._solve(inputs, now)
        self._remember(plan)
        return plan, self._first_steps(plan), f"rung{int(plan.rung)}"

    def _remember(self, plan: Plan) -> None:
        if plan.cause in SOLVED:
            self.last_plan = plan

    def _idle(self, now: float, cause: PlanCause, reason: str) -> Plan:
        ctl = self.settings.control
        return safe_idle_plan(
            [d.id for d in self.batteries],
            time=now,
            step_s=ctl.step_s,
            steps=ctl.horizon_steps,
            reason=reason,
            cause=cause,
        )

    def _descend(
        self,
        now: float,
        snapshot: Snapshot,
        forecast: Forecast,
        *,
        cause: PlanCause,
        reason: str,
        allow_last_plan: bool = True,
    ) -> Plan:
        """Rungs 3-5 (:func:`essd.ladder.descend`): rule-based only with valid inputs."""

        def rule_based() -> Plan:
            return rule_based_plan(self.specs, self._inputs(now, snapshot, forecast), cause=cause)

        return descend(
            now=now,
            cause=cause,
            reason=reason,
            device_ids=[d.id for d in self.batteries],
            last_plan=self.last_plan,
            rule_based=rule_based if self.specs else None,
            safe_idle=lambda: self._idle(now, cause, reason),
            allow_last_plan=allow_last_plan,
        )

    async def _solve(self, inputs: DispatchInputs, now: float) -> Plan:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        budget = self.settings.control.solve_budget_s
        if not self._realtime:
            # A stepped clock waits for the solve: the budget is real time, which a simulated
            # run does not have, and a slow host must give the same rungs as a fast one.
            budget = _STEPPED_SOLVE_BUDGET_S
        if self._solving is not None and not self._solving.done():
            return self._late_fallback(
                inputs, now, PlanCause.SOLVE_BUSY, "previous solve still running"
            )
        loop = asyncio.get_running_loop()
        last = self.last_plan
        fut = loop.run_in_executor(
            None, lambda: dispatcher.solve(inputs, budget_s=budget, last_plan=last)
        )
        self._solving = fut
        timeout = None if not self._realtime else budget * 1.5 + 0.05
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        if not done:
            return self._late_fallback(
                inputs, now, PlanCause.SOLVE_LATE, f"solve late after {budget * 1.5:.2f} s"
            )
        try:
            return fut.result()
        except Exception as exc:  # the dispatcher promises not to raise; be safe if it does
            log.exception("dispatcher failed")
            return self._late_fallback(inputs, now, PlanCause.SOLVER_ERROR, f"solver error: {exc}")

    def _late_fallback(
        self, inputs: DispatchInputs, now: float, cause: PlanCause, reason: str
    ) -> Plan:
        return descend(
            now=now,
            cause=cause,
            reason=reason,
            device_ids=[d.id for d in self.batteries],
            last_plan=self.last_plan,
            rule_based=lambda: rule_based_plan(self.specs, inputs, cause=cause),
            safe_idle=lambda: self._idle(now, cause, reason),
        )

    def _inputs(self, now: float, snapshot: Snapshot, forecast: Forecast) -> DispatchInputs:
        ctl = self.settings.control
        site = self.settings.site
        tariff = self.settings.tariff
        soc: dict[str, float] = {}
        limits: dict[str, LiveLimits] = {}
        availability: dict[str, list[bool]] = {}
        reserve: dict[str, float] = {}
        max_soc: dict[str, float] = {}
        for d in self.batteries:
            env = self._envelope(d)
            r = snapshot.batteries.get(d.id)
            value = r.soc.value if r is not None and r.soc.value is not None else None
            soc[d.id] = min(max(value if value is not None else env.reserve_soc, 0.0), 1.0)
            ok = d.healthy and r is not None and r.available
            limits[d.id] = _live_limits(env, r) if ok else LiveLimits(0.0, 0.0)
            availability[d.id] = [ok] * ctl.horizon_steps
            reserve[d.id] = env.reserve_soc
            max_soc[d.id] = env.max_soc
        # Energy left at the end is worth what it would cost to buy back at the cheapest time.
        terminal_value = max(0.0, float(np.min(forecast.import_price)))
        return DispatchInputs(
            time=now,
            step_s=ctl.step_s,
            soc=soc,
            limits=limits,
            reserve_soc=reserve,
            max_soc=max_soc,
            load_w=forecast.load_w.tolist(),
            pv_w=forecast.pv_w.tolist(),
            import_price=forecast.import_price.tolist(),
            export_price=forecast.export_price.tolist(),
            availability=availability,
            carbon_intensity=(forecast.carbon_g_per_kwh / 1000.0).tolist(),
            carbon_price_per_kg=tariff.carbon_price_per_kg,
            demand_charge_per_kw=tariff.demand_charge_per_kw,
            peak_import_w=self._peak.peak_w,
            import_limit_w=site.grid_import_limit_w,
            export_limit_w=site.grid_export_limit_w,
            previous_setpoint_w={
                d.id: d.written.power_w if d.written is not None else 0.0 for d in self.batteries
            },
            terminal_value_per_kwh=terminal_value,
        )

    async def _write(
        self, setpoints: Mapping[str, Setpoint], *, standby: bool
    ) -> dict[str, WriteOutcome]:
        """Write every unit concurrently; one unit's failure never stops another's write."""

        async def one(d: ManagedDevice) -> WriteOutcome:
            sp = setpoints.get(d.id)
            if standby or d.state in (DeviceState.FAULT, DeviceState.SAFE):
                if not d.safe_written and not await d.enter_safe_mode():
                    return d.outcome(WriteStatus.FAILED, d.last_write_error or d.reason)
                if standby and d.state is DeviceState.RUNNING:
                    d.hold_safe("standby")  # its safe mode is written and read back
                return d.outcome(WriteStatus.SAFE_MODE)
            if d.state is DeviceState.DEGRADED:
                # Answering but with bad data: put it in safe mode once. Not answering: its
                # revert timer or heartbeat takes it to safe on its own.
                answers = d.last is not None and not d.safe_written and _answers(d)
                if answers and not await d.enter_safe_mode():
                    return d.outcome(WriteStatus.FAILED, d.last_write_error)
                return d.outcome(WriteStatus.SAFE_MODE if d.safe_written else WriteStatus.SKIPPED)
            if sp is not None and d.state in (DeviceState.RUNNING, DeviceState.WRITE_FAILED):
                return await d.apply(sp)
            return d.outcome(WriteStatus.SKIPPED)

        async def isolated(d: ManagedDevice) -> tuple[str, WriteOutcome]:
            try:
                return d.id, await one(d)
            except Exception as exc:  # a device's write must never end the cycle
                self._phase_failed("write", exc)
                return d.id, d.outcome(WriteStatus.FAILED, f"{type(exc).__name__}: {exc}")

        return dict(await asyncio.gather(*(isolated(d) for d in self.batteries)))

    def _integrate(
        self,
        now: float,
        mono: float,
        grid: float | None,
        snapshot: Snapshot,
        forecast: Forecast,
    ) -> None:
        """Add this cycle's energy, cost and carbon to the totals and the billing peak.

        The interval comes from the monotonic clock, so a wall-clock step neither adds nor
        removes energy; the wall clock only says which billing period and window it is.
        """
        last = self._last_mono
        self._last_mono = mono
        if last is None or grid is None:
            return
        dt = min(max(0.0, mono - last), _MAX_INTEGRATION_S)
        kwh_in = max(0.0, grid) * dt / 3.6e6
        kwh_out = max(0.0, -grid) * dt / 3.6e6
        co2 = kwh_in * float(forecast.carbon_g_per_kwh[0]) / 1000.0
        charged = discharged = battery_w = 0.0
        for r in snapshot.batteries.values():
            if r.power_w.valid and r.power_w.value is not None:
                battery_w += r.power_w.value
                wh = r.power_w.value * dt / 3600.0
                discharged += max(0.0, wh)
                charged += max(0.0, -wh)
                c, d = self._unit_wh.get(r.device_id, (0.0, 0.0))
                self._unit_wh[r.device_id] = (c + max(0.0, -wh), d + max(0.0, wh))
        tot = self._totals
        cost = (
            kwh_in * float(forecast.import_price[0])
            - kwh_out * float(forecast.export_price[0])
            + co2 * self.settings.tariff.carbon_price_per_kg
        )
        prices = {
            "import_price": float(forecast.import_price[0]),
            "export_price": float(forecast.export_price[0]),
            "carbon_g_per_kwh": float(forecast.carbon_g_per_kwh[0]),
            "carbon_price_per_kg": self.settings.tariff.carbon_price_per_kg,
        }
        # With every battery idle, the meter would have read grid + battery power.
        saved = step_cost(grid + battery_w, dt, **prices) - step_cost(grid, dt, **prices)
        pv = measured_pv_w(snapshot) or 0.0
        self._totals = SiteTotals(
            imported_wh=tot.imported_wh + kwh_in * 1000.0,
            exported_wh=tot.exported_wh + kwh_out * 1000.0,
            cost=tot.cost + cost,
            co2_kg=tot.co2_kg + co2,
            battery_charged_wh=tot.battery_charged_wh + charged,
            battery_discharged_wh=tot.battery_discharged_wh + discharged,
            pv_wh=tot.pv_wh + max(0.0, pv) * dt / 3600.0,
            savings=tot.savings + saved,
        )
        self._peak.add(now, grid, dt)

    async def safe_stop(self, timeout_s: float = 5.0) -> dict[str, bool]:
        """Write safe mode to every storage unit concurrently within ``timeout_s`` (real s)."""
        results: dict[str, bool] = {}

        async def one(d: ManagedDevice) -> None:
            try:
                async with asyncio.timeout(timeout_s):
                    results[d.id] = await d.enter_safe_mode()
            except TimeoutError:
                results[d.id] = False
            d.hold_safe("stopping")

        await asyncio.gather(*(one(d) for d in self.batteries))
        return results


def _unit_energy(data: Any) -> dict[str, tuple[float, float]]:
    """The durable per-unit energy counters; ValueError naming the field when they do not fit."""
    if not isinstance(data, Mapping):
        raise ValueError("unit_wh: must be an object of device id -> [charged_wh, discharged_wh]")
    out = {}
    for k, v in data.items():
        ok = (
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        )
        if not ok or not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError(f"unit_wh.{k}: must be [charged_wh, discharged_wh], both >= 0")
        out[str(k)] = (float(v[0]), float(v[1]))
    return out


def _answers(d: ManagedDevice) -> bool:
    last = d.last
    return isinstance(last, BatteryReading) and last.available


def _live_limits(env: DeviceEnvelope, reading: BatteryReading | None) -> LiveLimits:
    """A unit's power limits now: its static envelope tightened by the live BMS limits (the
    guard applies the same rule, and the SoC window on top, in essd.safety)."""
    live = LiveLimits(env.max_charge_w, env.max_discharge_w)
    if reading is not None and reading.limits is not None:
        live = live.tighten(reading.limits)
    return live


def _commanded(d: ManagedDevice) -> float | None:
    controlled = d.state in (DeviceState.RUNNING, DeviceState.WRITE_FAILED)
    return d.written.power_w if d.written is not None and controlled else None


_NON_NEGATIVE = ("pv_w", "carbon_g_per_kwh")


def _sanitize(forecast: Forecast, make_safe: Callable[[], Forecast]) -> tuple[Forecast, list[str]]:
    """``forecast`` with every non-finite value (and negative PV or carbon) replaced by the
    value of the safe forecast ``make_safe()`` for that step (built only when needed); also
    the names of the series that needed it."""
    names = ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")
    steps = len(forecast.load_w)

    def wrong_at(name: str, arr: np.ndarray) -> np.ndarray:
        wrong: np.ndarray = ~np.isfinite(arr)
        if name in _NON_NEGATIVE:
            wrong |= np.nan_to_num(arr, nan=0.0) < 0
        return wrong

    current = {n: np.asarray(getattr(forecast, n), dtype=np.float64) for n in names}
    if all(a.shape == (steps,) and not wrong_at(n, a).any() for n, a in current.items()):
        return forecast, []
    safe = make_safe()
    bad: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        arr = current[name]
        fallback = np.asarray(getattr(safe, name), dtype=np.float64)
        if arr.shape != fallback.shape:
            bad.append(name)
            arrays[name] = fallback
            continue
        wrong = wrong_at(name, arr)
        if wrong.any():
            bad.append(name)
            arr = np.where(wrong, fallback, arr)
        arrays[name] = arr
    if not bad:
        return forecast, bad
    return Forecast(start=forecast.start, step_s=forecast.step_s, **arrays), bad


def _idle_result(batteries: Sequence[ManagedDevice], mono: float, ttl_s: float) -> GuardResult:
    """0 W for every unit: what the cycle applies when the guard itself failed."""
    setpoints = {
        d.id: Setpoint(device_id=d.id, power_w=0.0, issued_at_mono=mono, ttl_s=ttl_s, source="safe")
        for d in batteries
    }
    return GuardResult(setpoints, {d.id: ("guard failed",) for d in batteries}, None, 0.0)


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")
    return float(value)


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _number(data, key)


def _object(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key}: must be an object")
    return value


def _plan_data(plan: Plan) -> dict[str, Any]:
    """A plan as JSON-ready data (a non-finite objective becomes null)."""
    return {
        "created_at": plan.created_at,
        "step_s": plan.step_s,
        "device_ids": list(plan.device_ids),
        "power_w": {d: list(v) for d, v in plan.power_w.items()},
        "soc": {d: list(v) for d, v in plan.soc.items()},
        "grid_w": list(plan.grid_w),
        "objective": plan.objective if math.isfinite(plan.objective) else None,
        "solver_status": plan.solver_status,
        "rung": int(plan.rung),
        "reason": plan.reason,
        "cause": plan.cause.value,
        "import_price": list(plan.import_price),
        "export_price": list(plan.export_price),
    }


def _floats(data: Mapping[str, Any], key: str) -> tuple[float, ...]:
    values = data.get(key)
    if not isinstance(values, list):
        raise ValueError(f"{key}: must be a list of numbers")
    out = tuple(float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    if len(out) != len(values) or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{key}: must be a list of finite numbers")
    return out


def _plan_from_data(data: Mapping[str, Any]) -> Plan:
    """The plan :func:`_plan_data` gave; ValueError naming the field otherwise."""
    ids = data.get("device_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("last_plan.device_ids: must be a list of ids")
    power = _object(data, "power_w")
    soc = _object(data, "soc")
    grid = _floats(data, "grid_w")
    plan = Plan(
        created_at=_number(data, "created_at"),
        step_s=_number(data, "step_s"),
        device_ids=tuple(ids),
        power_w={d: _floats(power, d) for d in ids},
        soc={d: _floats(soc, d) for d in ids},
        grid_w=grid,
        objective=math.nan if data.get("objective") is None else _number(data, "objective"),
        solver_status=str(data.get("solver_status", "")),
        rung=FallbackRung(int(_number(data, "rung"))),
        reason=str(data.get("reason", "")),
        cause=PlanCause(str(data.get("cause"))),
        import_price=_floats(data, "import_price"),
        export_price=_floats(data, "export_price"),
    )
    if plan.step_s <= 0 or any(len(p) != len(grid) for p in plan.power_w.values()):
        raise ValueError("last_plan: steps do not match")
    return plan
