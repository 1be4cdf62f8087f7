"""The cycle's guard phase and the per-device record of what it decided.

The credibility screen first decides what the guard may believe of each unit and of the
meter; the safety supervisor (:func:`essd.safety.guard`) then turns the requests into safe
setpoints. A guard that fails, or gives a non-finite setpoint, idles every unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from essd.credibility import CredibilityMonitor, CredibilityReport
from essd.cycle.decide import live_limits
from essd.devices import ManagedDevice
from essd.domain import DeviceState, FallbackRung, Plan, PlanCause, Setpoint, Snapshot
from essd.events import DeviceLimits, DeviceRecord, WriteOutcome, WriteStatus
from essd.safety import DeviceEnvelope, GuardInput, GuardResult, guard


@dataclass(frozen=True, slots=True)
class GuardPhase:
    """What the guard phase needs that does not change from cycle to cycle."""

    credibility: CredibilityMonitor
    batteries: Sequence[ManagedDevice]
    cycle_period_s: float
    setpoint_ttl_s: float
    import_limit_w: float
    export_limit_w: float
    on_failure: Callable[[str, BaseException], str]
    demand_charge: bool = False  # the tariff bills the peak: charging may not raise it

    def __call__(
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
        peak_w: float = 0.0,
    ) -> tuple[GuardResult, Plan, CredibilityReport | None]:
        """Safe setpoints, the plan with the guard's verdict, and the credibility report.

        ``peak_w``: the billing period's running billed peak; with a demand charge, charging
        under a plan may not take the import above it or above the import the plan accepted
        for this step, whichever is higher (a manual setpoint is the operator's call).
        """
        report: CredibilityReport | None = None
        cap = None
        if self.demand_charge and source.startswith("rung"):
            cap = max(peak_w, plan.grid_w[0] if plan.grid_w else 0.0)
        try:
            screened = self.credibility.screen(
                GuardInput(
                    now_mono=mono,
                    dt_s=self.cycle_period_s,
                    ttl_s=self.setpoint_ttl_s,
                    envelopes=envelopes,
                    readings=snapshot.batteries,
                    healthy={d.id: d.healthy and not standby for d in self.batteries},
                    desired_w=desired,
                    previous_w={
                        d.id: d.written.power_w if d.written else 0.0 for d in self.batteries
                    },
                    grid_power_w=grid,
                    import_limit_w=self.import_limit_w,
                    export_limit_w=self.export_limit_w,
                    source=source,
                    charge_import_cap_w=cap,
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
            errors["guard"] = self.on_failure("guard", exc)
            result = _idle_result(self.batteries, mono, self.setpoint_ttl_s)
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


def device_records(
    batteries: Sequence[ManagedDevice],
    *,
    snapshot: Snapshot,
    envelopes: Mapping[str, DeviceEnvelope],
    desired: Mapping[str, float],
    result: GuardResult,
    outcomes: Mapping[str, WriteOutcome],
    mono: float,
    credibility: CredibilityReport | None,
    unit_wh: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, DeviceRecord]:
    """Each unit's line in the cycle record: limits, request, setpoint, write, verdicts."""
    records: dict[str, DeviceRecord] = {}
    for d in batteries:
        env = envelopes[d.id]
        live = live_limits(env, snapshot.batteries.get(d.id))
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
            charged_wh=(unit_wh or {}).get(d.id, (0.0, 0.0))[0],
            discharged_wh=(unit_wh or {}).get(d.id, (0.0, 0.0))[1],
            credible=verdict is None or verdict.credible,
            credibility=""
            if verdict is None or verdict.credible
            else f"{verdict.cause}: {verdict.detail}",
        )
    return records


def _commanded(d: ManagedDevice) -> float | None:
    controlled = d.state in (DeviceState.RUNNING, DeviceState.WRITE_FAILED)
    return d.written.power_w if d.written is not None and controlled else None


def _idle_result(batteries: Sequence[ManagedDevice], mono: float, ttl_s: float) -> GuardResult:
    """0 W for every unit: what the cycle applies when the guard itself failed."""
    setpoints = {
        d.id: Setpoint(device_id=d.id, power_w=0.0, issued_at_mono=mono, ttl_s=ttl_s, source="safe")
        for d in batteries
    }
    return GuardResult(setpoints, {d.id: ("guard failed",) for d in batteries}, None, 0.0)
