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
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from zoneinfo import ZoneInfo

import numpy as np

from essd.clock import Clock
from essd.config import Settings
from essd.credibility import CredibilityMonitor, settings_for_site, soc_resolution
from essd.devices import ManagedDevice
from essd.domain import (
    BatteryReading,
    DeviceState,
    FallbackRung,
    LiveLimits,
    MeterReading,
    Plan,
    Setpoint,
    Snapshot,
)
from essd.events import CycleCompleted, EventBus, SiteTotals
from essd.forecast import Forecast, Forecaster, Override, billing_period_start
from essd.optimizer import (
    BatterySpec,
    Dispatcher,
    DispatchInputs,
    InvalidDispatchInputsError,
    rule_based_plan,
    safe_idle_plan,
)
from essd.safety import DeviceEnvelope, GuardInput, guard

__all__ = ["PHASES", "CommandRejected", "Controller", "Mode"]

log = logging.getLogger(__name__)

PHASES = ("read", "snapshot", "forecast", "decide", "guard", "write", "publish")


class Mode:
    """Operating modes (strings on the wire)."""

    AUTO = "auto"
    MANUAL = "manual"
    STANDBY = "standby"
    ALL = (AUTO, MANUAL, STANDBY)


class CommandRejected(ValueError):
    """An operator command refused for a semantic reason; the message starts with the field."""


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
        self._last_time: float | None = None
        tz = ZoneInfo(settings.site.timezone)
        self._peak = _PeakTracker(ctl.step_s, tz)
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
        if not (math.isfinite(reserve_soc) and 0.0 <= reserve_soc <= 1.0):
            raise CommandRejected("reserve_soc: must be a ratio between 0 and 1")
        for d in self.batteries:
            if d.envelope is not None and reserve_soc >= d.envelope.max_soc:
                raise CommandRejected(
                    f"reserve_soc: must be below {d.id}'s max SoC {d.envelope.max_soc:g}"
                )
        self.reserve_override = reserve_soc

    def set_manual_setpoint(self, device_id: str, power_w: float, expires_at: float) -> None:
        """Command ``power_w`` (battery sign) for ``device_id`` until epoch ``expires_at``."""
        if self.mode != Mode.MANUAL:
            raise CommandRejected("mode: setpoints are accepted only in manual mode")
        if device_id not in {d.id for d in self.batteries}:
            raise CommandRejected(f"device: unknown battery {device_id!r}")
        if not math.isfinite(power_w):
            raise CommandRejected("power_w: must be finite")
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

    # --- the cycle -------------------------------------------------------------------------

    async def run_cycle(self) -> CycleCompleted:
        """Run one full cycle and publish it."""
        phase: dict[str, float] = {}
        started = time.perf_counter()
        now = self.clock.now()
        standby = self.mode == Mode.STANDBY

        t = time.perf_counter()
        await asyncio.gather(*(d.read(mode_safe=standby) for d in self.devices.values()))
        phase["read"] = time.perf_counter() - t

        t = time.perf_counter()
        snapshot = self._snapshot(now)
        grid = self._grid_power(snapshot)
        phase["snapshot"] = time.perf_counter() - t

        t = time.perf_counter()
        ctl = self.settings.control
        if grid is not None:
            measured = sum(
                r.power_w.value or 0.0 for r in snapshot.batteries.values() if r.power_w.valid
            )
            self.forecaster.observe_net_load(now, grid + measured)
        forecast = self.forecaster.forecast(now, ctl.step_s, ctl.horizon_steps)
        phase["forecast"] = time.perf_counter() - t

        t = time.perf_counter()
        plan, desired, source = await self._decide(now, snapshot, forecast)
        if not plan.import_price:
            n = plan.steps
            plan = replace(
                plan,
                import_price=tuple(forecast.import_price[:n].tolist()),
                export_price=tuple(forecast.export_price[:n].tolist()),
            )
        phase["decide"] = time.perf_counter() - t

        t = time.perf_counter()
        # Credibility (essd/credibility.py): what the guard may believe of readings and meter.
        screened = self.credibility.screen(
            GuardInput(
                now_mono=self.clock.monotonic(),
                dt_s=ctl.cycle_period_s,
                ttl_s=ctl.setpoint_ttl_s,
                envelopes={d.id: self._envelope(d) for d in self.batteries},
                readings=snapshot.batteries,
                healthy={d.id: d.healthy and not standby for d in self.batteries},
                desired_w=desired,
                previous_w={d.id: d.written.power_w if d.written else 0.0 for d in self.batteries},
                grid_power_w=grid,
                import_limit_w=self.settings.site.grid_import_limit_w,
                export_limit_w=self.settings.site.grid_export_limit_w,
                source=source,
            ),
            commanded_w={
                d.id: d.written.power_w if d.written and d.state is DeviceState.RUNNING else None
                for d in self.batteries
            },
        )
        result = guard(screened.guard_input)
        meter = screened.report.meter
        if not meter.plausible and self.batteries and plan.rung < FallbackRung.SAFE_IDLE:
            # The guard idled every battery: say so, whatever the optimizer had planned.
            plan = replace(
                plan,
                rung=FallbackRung.SAFE_IDLE,
                reason=f"meter {meter.cause}: {meter.detail}: every battery idles until it returns",
            )
        phase["guard"] = time.perf_counter() - t

        t = time.perf_counter()
        await self._write(result.setpoints, standby=standby)
        phase["write"] = time.perf_counter() - t

        t = time.perf_counter()
        self._integrate(now, grid, forecast)
        self.cycle_no += 1
        duration = time.perf_counter() - started
        real_period = ctl.cycle_period_s / self.clock.speed
        overrun = duration > real_period
        if overrun:
            self.overruns += 1
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
            credibility=screened.report,
        )
        self.bus.publish(event)
        return event

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
        self, now: float, snapshot: Snapshot, forecast: Forecast
    ) -> tuple[Plan, dict[str, float], str]:
        ids = [d.id for d in self.batteries]
        ctl = self.settings.control
        if self.mode == Mode.STANDBY:
            plan = safe_idle_plan(
                ids, time=now, step_s=ctl.step_s, steps=ctl.horizon_steps, reason="standby"
            )
            return plan, dict.fromkeys(ids, 0.0), "standby"
        if self.mode == Mode.MANUAL:
            desired = {}
            for dev_id in ids:
                m = self._manual.get(dev_id)
                desired[dev_id] = m.power_w if m is not None and m.expires_at > now else 0.0
            plan = safe_idle_plan(
                ids, time=now, step_s=ctl.step_s, steps=ctl.horizon_steps, reason="manual"
            )
            return plan, desired, "manual"
        if self.dispatcher is None:
            plan = safe_idle_plan(ids, time=now, step_s=ctl.step_s, steps=ctl.horizon_steps)
            return plan, dict.fromkeys(ids, 0.0), "safe"
        try:
            inputs = self._inputs(now, snapshot, forecast)
        except InvalidDispatchInputsError as exc:
            plan = safe_idle_plan(
                ids,
                time=now,
                step_s=ctl.step_s,
                steps=ctl.horizon_steps,
                reason=f"invalid inputs: {exc}",
            )
            return plan, dict.fromkeys(ids, 0.0), "safe"
        plan = await self._solve(inputs, now)
        self.last_plan = plan if plan.rung <= FallbackRung.SOFT else self.last_plan
        return plan, {d: plan.first_step_w(d) for d in ids}, f"rung{int(plan.rung)}"

    async def _solve(self, inputs: DispatchInputs, now: float) -> Plan:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        budget = self.settings.control.solve_budget_s
        if self._solving is not None and not self._solving.done():
            return self._late_fallback(inputs, now, "previous solve still running")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            None, lambda: dispatcher.solve(inputs, budget_s=budget, last_plan=self.last_plan)
        )
        self._solving = fut
        done, _ = await asyncio.wait({fut}, timeout=budget * 1.5 + 0.05)
        if not done:
            return self._late_fallback(inputs, now, f"solve late after {budget * 1.5:.2f} s")
        try:
            return fut.result()
        except Exception as exc:  # the dispatcher promises not to raise; be safe if it does
            log.exception("dispatcher failed")
            return self._late_fallback(inputs, now, f"solver error: {exc}")

    def _late_fallback(self, inputs: DispatchInputs, now: float, reason: str) -> Plan:
        if self.last_plan is not None:
            shifted = self.last_plan.shifted_to(
                now, rung=FallbackRung.LAST_PLAN, reason=f"{reason}; last plan shifted"
            )
            if shifted is not None and shifted.steps > 0:
                return shifted
        return rule_based_plan(self.specs, inputs, reason=f"{reason}; rule-based")

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
            live = LiveLimits(env.max_charge_w, env.max_discharge_w)
            if ok and r is not None and r.limits is not None:
                live = live.tighten(r.limits)
            limits[d.id] = live if ok else LiveLimits(0.0, 0.0)
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

    async def _write(self, setpoints: Mapping[str, Setpoint], *, standby: bool) -> None:
        async def one(d: ManagedDevice) -> None:
            sp = setpoints.get(d.id)
            if standby or d.state in (DeviceState.FAULT, DeviceState.SAFE):
                if not d.safe_written:
                    await d.enter_safe_mode()
                return
            if d.state is DeviceState.DEGRADED:
                # Answering but with bad data: put it in safe mode once. Not answering: its
                # revert timer or heartbeat takes it to safe on its own.
                if d.last is not None and not d.safe_written and _answers(d):
                    await d.enter_safe_mode()
                return
            if sp is not None and d.state is DeviceState.RUNNING:
                await d.apply(sp)

        await asyncio.gather(*(one(d) for d in self.batteries))

    def _integrate(self, now: float, grid: float | None, forecast: Forecast) -> None:
        if self._last_time is None or grid is None:
            self._last_time = now
            return
        dt = max(0.0, now - self._last_time)
        self._last_time = now
        kwh_in = max(0.0, grid) * dt / 3.6e6
        kwh_out = max(0.0, -grid) * dt / 3.6e6
        co2 = kwh_in * float(forecast.carbon_g_per_kwh[0]) / 1000.0
        tot = self._totals
        cost = (
            kwh_in * float(forecast.import_price[0])
            - kwh_out * float(forecast.export_price[0])
            + co2 * self.settings.tariff.carbon_price_per_kg
        )
        self._totals = SiteTotals(
            imported_wh=tot.imported_wh + kwh_in * 1000.0,
            exported_wh=tot.exported_wh + kwh_out * 1000.0,
            cost=tot.cost + cost,
            co2_kg=tot.co2_kg + co2,
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


def _answers(d: ManagedDevice) -> bool:
    last = d.last
    return isinstance(last, BatteryReading) and last.available
