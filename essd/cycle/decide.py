"""The cycle's decide phase: what each unit is asked to do, and the plan it comes from.

Auto mode solves the dispatch LP in a worker thread under a time budget; a solve still
running when the budget ends is left to finish in its thread and the cycle descends the
ladder (:mod:`essd.ladder`: last plan shifted, rule-based, safe idle). Inputs are validated
here, on the event loop, so a solver thread never sees bad data.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import get_args

import numpy as np
import numpy.typing as npt

from essd.commands import Mode as WireMode
from essd.config import Settings
from essd.devices import ManagedDevice
from essd.dispatch import (
    BatterySpec,
    Dispatcher,
    DispatchInputs,
    InvalidDispatchInputsError,
    ahead_inputs,
    rule_based_plan,
    safe_idle_plan,
    terminal_value,
)
from essd.dispatch.sessions import FlexSession
from essd.domain import BatteryReading, LiveLimits, Plan, PlanCause, Snapshot
from essd.forecast import Forecast
from essd.ladder import SOLVED, descend
from essd.safety import DeviceEnvelope

log = logging.getLogger(__name__)

# The demand charge is planned against the forecast import plus this many typical deviations
# of the load (the forecaster's spread): the expected highest import of a day is above the
# highest expected import, and a plan that just meets the forecast misses the real peak.
PEAK_MARGIN_SPREADS = 2.0

# On a stepped clock the solve is awaited whatever it takes (see Decider._solve).
_STEPPED_SOLVE_BUDGET_S = 3600.0


class Mode:
    """Operating modes: names for the values of :data:`essd.commands.Mode` (the wire contract)."""

    AUTO = "auto"
    MANUAL = "manual"
    STANDBY = "standby"
    ALL: tuple[str, ...] = get_args(WireMode)


@dataclass(frozen=True, slots=True)
class Manual:
    """An operator's setpoint for one unit (battery sign) until ``expires_at`` (epoch s)."""

    power_w: float
    expires_at: float


def live_limits(env: DeviceEnvelope, reading: BatteryReading | None) -> LiveLimits:
    """A unit's power limits now: its static envelope tightened by the live BMS limits (the
    guard applies the same rule, and the SoC window on top, in essd.safety)."""
    live = LiveLimits(env.max_charge_w, env.max_discharge_w)
    if reading is not None and reading.limits is not None:
        live = live.tighten(reading.limits)
    return live


class Decider:
    """Chooses the plan for a cycle and remembers the last solved one."""

    def __init__(
        self,
        *,
        settings: Settings,
        batteries: Sequence[ManagedDevice],
        specs: Sequence[BatterySpec],
        dispatcher: Dispatcher | None,
        envelope: Callable[[ManagedDevice], DeviceEnvelope],
        peak_w: Callable[[], float],
        realtime: bool,
        sessions: Callable[[float], Sequence[FlexSession]] | None = None,
        billed_so_far: Callable[[Snapshot], tuple[float, float]] | None = None,
    ) -> None:
        self._settings = settings
        # Flexible loads (EV sessions; essd.flexloads) planned with the batteries.
        self._sessions = sessions
        self._batteries = list(batteries)
        self._specs = list(specs)
        self._dispatcher = dispatcher
        self._envelope = envelope
        self._peak_w = peak_w
        # What the meter measured of the billing window under way (Wh imported, s), for the
        # first step's demand charge (essd.dispatch.inputs.first_step_peak_kw); None: nothing.
        self._billed_so_far = billed_so_far
        self._realtime = realtime
        self.last_plan: Plan | None = None
        self._solving: Future[Plan] | asyncio.Future[Plan] | None = None
        # The next step's LP solved ahead (Dispatcher.prepare) between this cycle and the next.
        self._ahead: asyncio.Future[bool] | None = None
        # That solve, decided by the cycle and started once its writes are out (start_between).
        self._ahead_job: Callable[[], bool] | None = None

    def first_steps(self, plan: Plan) -> dict[str, float]:
        """Each unit's power in the plan's first step (0 W for a unit it does not name)."""
        return {
            d.id: plan.first_step_w(d.id) if d.id in plan.power_w else 0.0 for d in self._batteries
        }

    async def decide(
        self,
        now: float,
        snapshot: Snapshot,
        forecast: Forecast,
        *,
        mode: str,
        manual: Mapping[str, Manual],
        forecast_cause: PlanCause | None,
        detail: str,
    ) -> tuple[Plan, dict[str, float], str]:
        """The plan, each unit's requested power and the setpoints' source."""
        ids = [d.id for d in self._batteries]
        if mode == Mode.STANDBY:
            plan = self.idle(now, PlanCause.STANDBY, "standby")
            return plan, dict.fromkeys(ids, 0.0), "standby"
        if mode == Mode.MANUAL:
            desired = {}
            for dev_id in ids:
                m = manual.get(dev_id)
                desired[dev_id] = m.power_w if m is not None and m.expires_at > now else 0.0
            return self.idle(now, PlanCause.MANUAL, "manual"), desired, "manual"
        if self._dispatcher is None:
            plan = self.idle(now, PlanCause.NO_BATTERY, "no battery to dispatch")
            return plan, dict.fromkeys(ids, 0.0), "safe"
        if forecast_cause is not None:
            plan = self.descend(now, snapshot, forecast, cause=forecast_cause, reason=detail)
            self._remember(plan)
            return plan, self.first_steps(plan), f"rung{int(plan.rung)}"
        try:
            inputs = self.inputs(now, snapshot, forecast)
            self._dispatcher.validate(inputs)
        except InvalidDispatchInputsError as exc:
            plan = self.descend(
                now,
                snapshot,
                forecast,
                cause=PlanCause.INVALID_INPUTS,
                reason=f"invalid inputs: {exc}",
                allow_last_plan=False,
            )
            return plan, self.first_steps(plan), "safe"
        plan = await self._solve(inputs, now)
        self._remember(plan)
        self._look_ahead(inputs, plan, now)
        return plan, self.first_steps(plan), f"rung{int(plan.rung)}"

    def _look_ahead(self, inputs: DispatchInputs, plan: Plan, now: float) -> None:
        """Before the cycle that starts a new step: solve that step's LP ahead, in the worker
        thread while the daemon sleeps (:meth:`start_between`), so the boundary's solve starts
        from a basis for its horizon (essd.dispatch.highs)."""
        ctl = self._settings.control
        step = ctl.step_s
        if plan.cause not in SOLVED or self._dispatcher is None:
            return
        if math.floor((now + ctl.cycle_period_s) / step) == math.floor(now / step):
            return
        ahead = ahead_inputs(inputs, plan)
        if ahead is None:
            return
        dispatcher = self._dispatcher
        budget = ctl.solve_budget_s
        self._ahead_job = lambda: dispatcher.prepare(ahead, budget_s=budget)

    def start_between(self) -> None:
        """Start the work the cycle left for between cycles (the look-ahead), called once the
        cycle's writes are out: started in the decide phase, the look-ahead's solve took the
        CPU from the writes and the simulated devices answering them (4 units: the write
        phase of a step's last cycle 4 -> 9-12 ms)."""
        job, self._ahead_job = self._ahead_job, None
        if job is not None:
            self._ahead = asyncio.get_running_loop().run_in_executor(None, job)

    async def settle(self) -> None:
        """Wait for the work this cycle left running between cycles (the next step's LP solved
        ahead); the next solve waits for it anyway."""
        if self._ahead is not None:
            await asyncio.wait({self._ahead})

    def _remember(self, plan: Plan) -> None:
        if plan.cause in SOLVED:
            self.last_plan = plan

    def idle(self, now: float, cause: PlanCause, reason: str) -> Plan:
        """Rung 5: every unit at 0 W over the horizon."""
        ctl = self._settings.control
        return safe_idle_plan(
            [d.id for d in self._batteries],
            time=now,
            step_s=ctl.step_s,
            steps=ctl.horizon_steps,
            reason=reason,
            cause=cause,
        )

    def descend(
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
        return self._ladder(
            now, cause, reason, lambda: self.inputs(now, snapshot, forecast), allow_last_plan
        )

    def _ladder(
        self,
        now: float,
        cause: PlanCause,
        reason: str,
        inputs: Callable[[], DispatchInputs],
        allow_last_plan: bool = True,
    ) -> Plan:
        def rule_based() -> Plan:
            return rule_based_plan(self._specs, inputs(), cause=cause)

        return descend(
            now=now,
            cause=cause,
            reason=reason,
            device_ids=[d.id for d in self._batteries],
            last_plan=self.last_plan,
            rule_based=rule_based if self._specs else None,
            safe_idle=lambda: self.idle(now, cause, reason),
            allow_last_plan=allow_last_plan,
        )

    async def _solve(self, inputs: DispatchInputs, now: float) -> Plan:
        dispatcher = self._dispatcher
        assert dispatcher is not None
        budget = self._settings.control.solve_budget_s
        if not self._realtime:
            # A stepped clock waits for the solve: the budget is real time, which a simulated
            # run does not have, and a slow host must give the same rungs as a fast one.
            budget = _STEPPED_SOLVE_BUDGET_S
        if self._ahead is not None:
            # The dispatcher solves one LP at a time: the look-ahead first (it had a cycle
            # period; a stepped clock has none and waits).
            await asyncio.wait({self._ahead}, timeout=budget if self._realtime else None)
            if not self._ahead.done():
                return self._late(inputs, now, PlanCause.SOLVE_BUSY, "look-ahead still running")
            self._ahead = None
        if self._solving is not None and not self._solving.done():
            return self._late(inputs, now, PlanCause.SOLVE_BUSY, "previous solve still running")
        loop = asyncio.get_running_loop()
        last = self.last_plan
        fut = loop.run_in_executor(
            None, lambda: dispatcher.solve(inputs, budget_s=budget, last_plan=last)
        )
        self._solving = fut
        timeout = None if not self._realtime else budget * 1.5 + 0.05
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        if not done:
            return self._late(
                inputs, now, PlanCause.SOLVE_LATE, f"solve late after {budget * 1.5:.2f} s"
            )
        try:
            return fut.result()
        except Exception as exc:  # the dispatcher promises not to raise; be safe if it does
            log.exception("dispatcher failed")
            return self._late(inputs, now, PlanCause.SOLVER_ERROR, f"solver error: {exc}")

    def _late(self, inputs: DispatchInputs, now: float, cause: PlanCause, reason: str) -> Plan:
        return self._ladder(now, cause, reason, lambda: inputs)

    def inputs(self, now: float, snapshot: Snapshot, forecast: Forecast) -> DispatchInputs:
        """The dispatch problem's data for this cycle."""
        ctl = self._settings.control
        site = self._settings.site
        tariff = self._settings.tariff
        soc: dict[str, float] = {}
        limits: dict[str, LiveLimits] = {}
        availability: dict[str, list[bool]] = {}
        reserve: dict[str, float] = {}
        max_soc: dict[str, float] = {}
        for d in self._batteries:
            env = self._envelope(d)
            r = snapshot.batteries.get(d.id)
            value = r.soc.value if r is not None and r.soc.value is not None else None
            soc[d.id] = min(max(value if value is not None else env.reserve_soc, 0.0), 1.0)
            ok = d.healthy and r is not None and r.available
            limits[d.id] = live_limits(env, r) if ok else LiveLimits(0.0, 0.0)
            availability[d.id] = [ok] * ctl.horizon_steps
            reserve[d.id] = env.reserve_soc
            max_soc[d.id] = env.max_soc
        # Energy left at the end is worth what it would cost to store again in the horizon.
        room_kwh = sum(
            (self._envelope(d).max_soc - self._envelope(d).reserve_soc)
            * self._envelope(d).capacity_wh
            / 1000.0
            for d in self._batteries
        )
        tvalue = terminal_value(
            forecast.import_price,
            forecast.export_price,
            forecast.load_w - forecast.pv_w,
            ctl.step_s,
            room_kwh,
        )
        # Headroom for forecast error: a plan that just touches the running peak exceeds it
        # whenever the load comes in above its forecast.
        peak_w = self._peak_w() * (1.0 - tariff.demand_headroom_ratio)
        # The billing window under way (control.plan_billing_window): measured so far, and the
        # level it may reach; without the option nothing of it is computed.
        billed_wh, billed_s, billed_peak_w = 0.0, 0.0, None
        if ctl.plan_billing_window and self._billed_so_far is not None:
            billed_wh, billed_s = self._billed_so_far(snapshot)
            billed_peak_w = max(peak_w, self._planned_peak_w(now, forecast.load_spread_w))
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
            peak_import_w=peak_w,
            import_limit_w=site.grid_import_limit_w,
            export_limit_w=site.grid_export_limit_w,
            terminal_soc={
                d.id: d.config.terminal_soc
                for d in self._batteries
                if d.config.terminal_soc is not None
            },
            previous_setpoint_w={
                d.id: d.written.power_w if d.written is not None else 0.0 for d in self._batteries
            },
            terminal_value_per_kwh=tvalue,
            pv_curtailable=site.pv_curtailable,
            peak_margin_w=None
            if forecast.load_spread_w is None
            else (PEAK_MARGIN_SPREADS * forecast.load_spread_w).tolist(),
            sessions=tuple(self._sessions(now)) if self._sessions is not None else (),
            billed_import_wh=billed_wh,
            billed_elapsed_s=billed_s,
            billed_peak_w=billed_peak_w,
        )

    def _planned_peak_w(self, now: float, spread_w: npt.NDArray[np.float64] | None) -> float:
        """The peak the last solved plan expects to bill after the current step: its highest
        import plus the margin the LP adds there (0 W without a plan). It stands for the new
        peak the plan sets anyway in the first step's demand-charge row
        (essd.dispatch.inputs.first_step_peak_kw), which is exact when the two agree."""
        plan = self.last_plan
        if plan is None or not plan.covers(now):
            return 0.0
        k = int((now - plan.created_at) // plan.step_s)
        later = np.asarray(plan.grid_w[k + 1 :], dtype=float)
        if spread_w is not None and later.size:
            n = min(later.size, max(0, spread_w.size - 1))
            later[:n] += PEAK_MARGIN_SPREADS * spread_w[1 : n + 1]
        return float(later.max(initial=0.0))


def battery_specs(
    batteries: Sequence[ManagedDevice], degradation_cost_per_kwh: float
) -> list[BatterySpec]:
    """The LP's description of each storage unit (its envelope; its own degradation cost or
    the site's)."""
    return [
        BatterySpec(
            id=d.id,
            capacity_wh=d.envelope.capacity_wh,
            charge_efficiency=d.envelope.charge_efficiency,
            discharge_efficiency=d.envelope.discharge_efficiency,
            degradation_cost_per_kwh=(
                d.config.degradation_cost_per_kwh
                if d.config.degradation_cost_per_kwh is not None
                else degradation_cost_per_kwh
            ),
            can_discharge=d.envelope.can_discharge,
        )
        for d in batteries
        if d.envelope is not None
    ]
