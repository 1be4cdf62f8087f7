"""The JSON payloads of the MQTT contract (``docs/mqtt.md``), built from the cycle's record.

Sign conventions in every payload: battery W > 0 discharges into the site, < 0 charges; grid
W > 0 imports; SoC as a ratio 0..1; energy Wh.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from essd.domain import BatteryReading, DeviceState, FallbackRung, Plan, Quality
from essd.events import CycleCompleted, ForecastRecord

#: Version of the JSON payloads; bumped on any incompatible change (docs/mqtt.md).
SCHEMA_VERSION = 1


OptFloat = float | None


def _num(value: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite number is published as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat()


class _Payload(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, serialize_by_alias=True, validate_by_name=True
    )

    # "schema" would shadow a BaseModel attribute, hence the alias.
    schema_version: int = Field(
        SCHEMA_VERSION, alias="schema", description="Payload schema version"
    )

    def to_payload(self) -> bytes:
        """Compact JSON bytes as published."""
        return self.model_dump_json().encode()


class TotalsPayload(BaseModel):
    """Cumulative site figures, kept in the durable state across restarts (energies only grow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    imported_wh: OptFloat = Field(description="Energy imported from the grid, Wh")
    exported_wh: OptFloat = Field(description="Energy exported to the grid, Wh")
    cost: OptFloat = Field(description="Energy cost (import - export) plus carbon, currency")
    co2_kg: OptFloat = Field(description="Grid carbon emissions attributed to imports, kg")
    battery_charged_wh: OptFloat = Field(None, description="AC energy into the batteries, Wh")
    battery_discharged_wh: OptFloat = Field(None, description="AC energy out of the batteries, Wh")
    pv_wh: OptFloat = Field(None, description="PV energy the units measured, Wh (0 where none)")
    savings: OptFloat = Field(
        None,
        description="What the batteries saved: cost with every battery idle minus cost paid, "
        "currency (demand charge excluded; negative while they cost more)",
    )


class StatePayload(_Payload):
    """``state``: the site after one control cycle (retained)."""

    site_id: str
    time: float = Field(description="End of the cycle, epoch seconds")
    time_iso: str = Field(description="Same as time, ISO 8601 UTC")
    cycle: int = Field(description="Cycle counter since start")
    mode: str = Field(description="auto | manual | standby")
    reserve_soc: OptFloat = Field(description="Reserve SoC ratio 0..1")
    soc: OptFloat = Field(description="Capacity-weighted site SoC ratio 0..1 (valid readings)")
    stored_wh: OptFloat = Field(description="Energy stored over all batteries with a valid SoC")
    battery_power_w: OptFloat = Field(
        description="Sum of measured battery power, W; > 0 discharges, < 0 charges"
    )
    setpoint_w: float = Field(description="Sum of the applied setpoints, W; > 0 discharges")
    grid_power_w: OptFloat = Field(description="Grid power at the connection, W; > 0 imports")
    import_limit_w: OptFloat = Field(description="Site import limit, W >= 0")
    export_limit_w: OptFloat = Field(description="Site export limit, W >= 0")
    import_price: OptFloat = Field(description="Current import price per kWh")
    export_price: OptFloat = Field(description="Current export price per kWh")
    carbon_intensity_g_per_kwh: OptFloat = Field(description="Grid carbon intensity, g/kWh")
    fallback_rung: int = Field(description="1 optimal .. 5 safe idle (docs/architecture.md ladder)")
    fallback_rung_name: str = Field(description="optimal | soft | last_plan | ...")
    fallback_reason: str = Field(description="Why this rung is active (empty when optimal)")
    fallback_cause: str = Field(
        "", description="Why, as a typed cause: optimal | solver_timeout | stale_data | ..."
    )
    predicted_grid_w: OptFloat = Field(
        None, description="Grid power the guard predicts after this cycle's setpoints, W"
    )
    site_limit_unmet_w: OptFloat = Field(
        None, description="How far a site limit stays exceeded (no unit had headroom), W"
    )
    phase_errors: dict[str, str] = Field(
        default_factory=dict, description="Phases that failed this cycle -> error"
    )
    cycle_duration_s: OptFloat = Field(description="Duration of the cycle, s")
    cycle_period_s: OptFloat = Field(description="Configured cycle period, s")
    overruns_total: int = Field(description="Cycles that overran their period since start")
    devices: dict[str, str] = Field(description="Device id -> lifecycle state")
    totals: TotalsPayload
    pv_power_w: OptFloat = Field(
        None, description="PV power the units measure themselves, W (null where none does)"
    )
    net_load_w: OptFloat = Field(
        None, description="Site consumption less unmeasured PV (grid + battery + measured PV), W"
    )
    billing_peak_w: OptFloat = Field(
        None, description="The billing period's running peak of the per-step mean import, W"
    )
    charger_limits_w: dict[str, OptFloat] = Field(
        default_factory=dict,
        description="EV chargers: the limit sent to each this cycle, W (0: paused)",
    )


class PlanPayload(_Payload):
    """``plan``: the dispatch plan over the horizon (retained); only step 0 is applied."""

    site_id: str
    created_at: float = Field(description="Start of step 0, epoch seconds")
    created_at_iso: str
    step_s: float = Field(description="Length of one step, s")
    horizon_steps: int = Field(description="Number of steps")
    horizon_end: float = Field(description="End of the last step, epoch seconds")
    device_ids: list[str]
    power_w: dict[str, list[OptFloat]] = Field(
        description="Per device, per step: W, > 0 discharges, < 0 charges"
    )
    soc: dict[str, list[OptFloat]] = Field(
        description="Per device: predicted SoC ratio at the start of each step (steps + 1)"
    )
    grid_w: list[OptFloat] = Field(description="Predicted grid power per step, W; > 0 imports")
    import_price: list[OptFloat] = Field(
        description="Import price per kWh per step the plan used (empty if not recorded)"
    )
    export_price: list[OptFloat] = Field(
        description="Export price per kWh per step the plan used (empty if not recorded)"
    )
    objective: OptFloat = Field(description="Objective value (currency); null if not solved")
    solver_status: str
    fallback_rung: int = Field(description="1 optimal .. 5 safe idle")
    fallback_rung_name: str
    fallback_reason: str
    fallback_cause: str = Field("", description="Why, as a typed cause (see the state payload)")
    slack: dict[str, OptFloat] = Field(description="Soft-constraint slack by constraint name")
    solve_s: OptFloat = Field(description="Solver wall time, s")
    battery_w: list[OptFloat] = Field(
        default_factory=list, description="All batteries together per step, W; > 0 discharges"
    )
    forecast_load_w: list[OptFloat] = Field(
        default_factory=list,
        description="Load forecast the plan saw per step (net of unmeasured PV), W",
    )
    forecast_pv_w: list[OptFloat] = Field(
        default_factory=list, description="PV forecast per step, W"
    )
    forecast_carbon_g_per_kwh: list[OptFloat] = Field(
        default_factory=list, description="Grid carbon intensity forecast per step, g/kWh"
    )
    session_power_w: dict[str, list[OptFloat]] = Field(
        default_factory=dict,
        description="Per EV session (<charger>/<transaction>) or swap pack, per step: W,"
        " battery sign (< 0 charges the vehicle, > 0 V2G); its shortfall is in slack as"
        " session_shortfall_wh[<id>]",
    )


class DeviceStatePayload(_Payload):
    """``device/<id>/state``: one device after the latest cycle (retained)."""

    site_id: str
    device_id: str
    time: float = Field(description="Time of the newest data in this payload, epoch seconds")
    state: str = Field(description="connecting | running | degraded | write_failed | fault | safe")
    reason: str = Field(description="Why the device entered this state (may be empty)")
    device_class: str | None = Field(description="industrial | household | portable | meter")
    available: bool | None = Field(description="False when the unit did not answer")
    soc: OptFloat = Field(description="SoC ratio 0..1 (null unless valid)")
    soc_quality: str | None = Field(description="good | stale | invalid | missing")
    power_w: OptFloat = Field(description="Measured W, > 0 discharges, < 0 charges")
    power_quality: str | None
    capacity_wh: OptFloat
    max_charge_w: OptFloat = Field(description="Live charge limit, W >= 0 (magnitude)")
    max_discharge_w: OptFloat = Field(description="Live discharge limit, W >= 0")
    setpoint_w: OptFloat = Field(description="Applied setpoint, W, > 0 discharges")
    setpoint_source: str | None
    setpoint_ttl_s: OptFloat
    planned_w: OptFloat = Field(description="Plan step 0 for this device, W")
    alarms: list[str]
    warnings: list[str] = Field(
        default_factory=list,
        description="States and alarm bits of severity warning (reported; only alarms fault)",
    )
    requested_w: OptFloat = Field(None, description="What the plan or operator asked, W")
    guard_reasons: list[str] = Field(
        default_factory=list, description="Why the setpoint differs from the request"
    )
    reserve_soc: OptFloat = Field(None, description="Reserve SoC the guard enforced, 0..1")
    max_soc: OptFloat = Field(None, description="Highest SoC the guard allowed, 0..1")
    write_status: str | None = Field(
        None, description="written | held | failed | safe_mode | skipped"
    )
    write_error: str | None = Field(None, description="The last write error this cycle")
    write_failures: int | None = Field(None, description="Cycles in a row whose write failed")
    accepted_setpoint_w: OptFloat = Field(
        None, description="The setpoint the device last accepted, W (null after safe mode)"
    )
    setpoint_age_s: OptFloat = Field(
        None, description="Seconds since the device last accepted a write"
    )
    credible: bool | None = Field(
        None, description="False while essd holds it at 0 W because its readings are not credible"
    )
    credibility: str | None = Field(None, description="Why its readings are not believed")
    charged_wh: OptFloat = Field(
        None, description="AC energy into this unit, Wh (durable; only grows)"
    )
    discharged_wh: OptFloat = Field(
        None, description="AC energy out of this unit, Wh (durable; only grows)"
    )


def _site_soc(batteries: Iterable[BatteryReading]) -> tuple[float | None, float | None]:
    """Capacity-weighted SoC and stored Wh over the batteries with a valid SoC."""
    cap = stored = 0.0
    for b in batteries:
        if b.soc.valid and b.soc.value is not None and b.capacity_wh > 0:
            cap += b.capacity_wh
            stored += b.soc.value * b.capacity_wh
    if cap <= 0:
        return None, None
    return stored / cap, stored


def _rung_name(rung: FallbackRung) -> str:
    return rung.name.lower()


def build_state_payload(site_id: str, ev: CycleCompleted) -> StatePayload:
    """The ``state`` payload of one completed cycle."""
    batteries = list(ev.snapshot.batteries.values())
    soc, stored = _site_soc(batteries)
    powers = [b.power_w.value for b in batteries if b.power_w.valid and b.power_w.value is not None]
    return StatePayload(
        site_id=site_id,
        time=ev.time,
        time_iso=_iso(ev.time),
        cycle=ev.cycle,
        mode=ev.mode,
        reserve_soc=_num(ev.reserve_soc),
        soc=_num(soc),
        stored_wh=_num(stored),
        battery_power_w=_num(sum(powers)) if powers else None,
        setpoint_w=_num(sum(s.power_w for s in ev.setpoints.values())) or 0.0,
        grid_power_w=_num(ev.grid_power_w),
        import_limit_w=_num(ev.import_limit_w),
        export_limit_w=_num(ev.export_limit_w),
        import_price=_num(ev.import_price),
        export_price=_num(ev.export_price),
        carbon_intensity_g_per_kwh=_num(ev.carbon_intensity_g_per_kwh),
        fallback_rung=int(ev.plan.rung),
        fallback_rung_name=_rung_name(ev.plan.rung),
        fallback_reason=ev.plan.reason,
        fallback_cause=ev.plan.cause.value,
        predicted_grid_w=_num(ev.predicted_grid_w),
        site_limit_unmet_w=_num(ev.site_limit_unmet_w),
        phase_errors=dict(ev.phase_errors),
        cycle_duration_s=_num(ev.duration_s),
        cycle_period_s=_num(ev.period_s),
        overruns_total=ev.overruns_total,
        devices={d: s.value for d, s in sorted(ev.device_states.items())},
        totals=TotalsPayload(
            imported_wh=_num(ev.totals.imported_wh),
            exported_wh=_num(ev.totals.exported_wh),
            cost=_num(ev.totals.cost),
            co2_kg=_num(ev.totals.co2_kg),
            battery_charged_wh=_num(ev.totals.battery_charged_wh),
            battery_discharged_wh=_num(ev.totals.battery_discharged_wh),
            pv_wh=_num(ev.totals.pv_wh),
            savings=_num(ev.totals.savings),
        ),
        pv_power_w=_num(ev.pv_power_w),
        net_load_w=_num(ev.net_load_w),
        billing_peak_w=_num(ev.billing_peak_w),
        charger_limits_w={c: _num(w) for c, w in sorted(ev.charger_limits_w.items())},
    )


def build_plan_payload(
    site_id: str, plan: Plan, forecast: ForecastRecord | None = None
) -> PlanPayload:
    """The ``plan`` payload of a dispatch plan (with the forecast it was made against)."""
    n = plan.steps
    battery = [sum(p[k] for p in plan.power_w.values() if k < len(p)) for k in range(n)]
    fc: dict[str, Any] = {}
    if forecast is not None:
        fc = {
            "forecast_load_w": [_num(v) for v in forecast.load_w[:n]],
            "forecast_pv_w": [_num(v) for v in forecast.pv_w[:n]],
            "forecast_carbon_g_per_kwh": [_num(v) for v in forecast.carbon_g_per_kwh[:n]],
        }
    return PlanPayload(
        site_id=site_id,
        created_at=plan.created_at,
        created_at_iso=_iso(plan.created_at),
        step_s=plan.step_s,
        horizon_steps=plan.steps,
        horizon_end=plan.created_at + plan.steps * plan.step_s,
        device_ids=list(plan.device_ids),
        power_w={d: [_num(v) for v in p] for d, p in plan.power_w.items()},
        soc={d: [_num(v) for v in s] for d, s in plan.soc.items()},
        grid_w=[_num(v) for v in plan.grid_w],
        import_price=[_num(v) for v in plan.import_price],
        export_price=[_num(v) for v in plan.export_price],
        objective=_num(plan.objective),
        solver_status=plan.solver_status,
        fallback_rung=int(plan.rung),
        fallback_rung_name=_rung_name(plan.rung),
        fallback_reason=plan.reason,
        fallback_cause=plan.cause.value,
        slack={k: _num(v) for k, v in plan.slack.items()},
        solve_s=_num(plan.solve_s),
        battery_w=[_num(v) for v in battery],
        **fc,
        session_power_w={s: [_num(v) for v in p] for s, p in plan.session_power_w.items()},
    )


def _quality(q: Quality | None) -> str | None:
    return None if q is None else q.value


def build_device_payload(
    site_id: str,
    device_id: str,
    *,
    time: float,
    state: DeviceState,
    reason: str,
    cycle: CycleCompleted | None,
) -> DeviceStatePayload:
    """The ``device/<id>/state`` payload from the latest cycle (if any) and lifecycle state."""
    b = cycle.snapshot.batteries.get(device_id) if cycle is not None else None
    sp = cycle.setpoints.get(device_id) if cycle is not None else None
    planned = None
    if cycle is not None and cycle.plan.power_w.get(device_id):
        planned = cycle.plan.power_w[device_id][0]
    rec = cycle.devices.get(device_id) if cycle is not None else None
    record: dict[str, Any] = {}
    if rec is not None:
        record = {
            "requested_w": _num(rec.requested_w),
            "guard_reasons": list(rec.guard_reasons),
            "reserve_soc": _num(rec.limits.reserve_soc) if rec.limits else None,
            "max_soc": _num(rec.limits.max_soc) if rec.limits else None,
            "write_status": rec.write.status.value,
            "write_error": rec.write.error or None,
            "write_failures": rec.write.consecutive_failures,
            "accepted_setpoint_w": _num(rec.write.power_w),
            "setpoint_age_s": _num(rec.setpoint_age_s),
            "credible": rec.credible,
            "credibility": rec.credibility or None,
            "charged_wh": _num(rec.charged_wh),
            "discharged_wh": _num(rec.discharged_wh),
        }
    return DeviceStatePayload(
        site_id=site_id,
        device_id=device_id,
        time=time,
        state=state.value,
        reason=reason,
        device_class=b.device_class.value if b is not None else None,
        available=b.available if b is not None else None,
        soc=_num(b.soc.value) if b is not None and b.soc.valid else None,
        soc_quality=_quality(b.soc.quality) if b is not None else None,
        power_w=_num(b.power_w.value) if b is not None and b.power_w.valid else None,
        power_quality=_quality(b.power_w.quality) if b is not None else None,
        capacity_wh=_num(b.capacity_wh) if b is not None else None,
        max_charge_w=_num(b.limits.max_charge_w) if b is not None and b.limits else None,
        max_discharge_w=_num(b.limits.max_discharge_w) if b is not None and b.limits else None,
        setpoint_w=_num(sp.power_w) if sp is not None else None,
        setpoint_source=sp.source if sp is not None else None,
        setpoint_ttl_s=_num(sp.ttl_s) if sp is not None else None,
        planned_w=_num(planned),
        alarms=list(b.alarms) if b is not None else [],
        warnings=list(b.warnings) if b is not None else [],
        **record,
    )
