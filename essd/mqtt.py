"""MQTT: the versioned topic contract (state, plan, devices, commands, Home Assistant discovery).

Topics live under ``<base_topic>/<site_id>/`` (``docs/mqtt.md`` is the contract):

- ``status``: ``online``/``offline``, retained; ``offline`` is also the last will, and a clean
  stop publishes it explicitly (a clean disconnect does not fire the will).
- ``state``: retained JSON :class:`StatePayload` after every cycle.
- ``plan``: retained JSON :class:`PlanPayload` whenever the core produced a new plan.
- ``device/<id>/state``: retained JSON :class:`DeviceStatePayload`.
- ``cmd/<name>``: commands, answered on ``cmd/<name>/result`` with a
  :class:`essd.commands.CommandResult` (exactly one reply per command).

Commands: applied only over an authenticated connection (username and password, or a TLS
client certificate) unless ``allow_anonymous_control`` is set; never when retained (MQTT 5
with retain-as-published shows the publisher's flag even on live delivery); checked against
the configured limits; queued in a bounded :class:`essd.command_queue.CommandQueue` where an
overflow answers the oldest ``dropped``. ``standby`` is applied on arrival, ahead of anything
queued. The receiver only moves messages from aiomqtt (whose own queue is unbounded, so it
never drops silently) into that queue; a separate task applies them and sends the replies.

Decoupling: the bridge subscribes to the :class:`essd.events.EventBus` with a handler that only
stores a reference to the newest event and wakes the MQTT task (O(1), never awaits, never
serializes), so a slow or absent broker cannot delay a control cycle. The MQTT task builds the
payloads from the newest values when it gets to them (older values are simply superseded),
reconnects with jittered exponential back-off on the injected clock, and republishes every
retained topic after each reconnect. The clock serves the back-off waits and "now" for
commands; payload times come from the events. (A *stepped* SimClock cannot wait, its ``sleep``
moves simulated time for everyone, so with one the back-off waits in real time.)

Sign conventions in every payload: battery W > 0 discharges into the site, < 0 charges; grid
W > 0 imports; SoC as a ratio 0..1; energy Wh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import secrets
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ConfigDict, Field

from essd import __version__
from essd.clock import Clock
from essd.command_queue import CommandQueue
from essd.commands import (
    CommandLimits,
    CommandModel,
    CommandResult,
    CommandTarget,
    apply_command,
    echo_id,
    is_safety_command,
    read_command,
)
from essd.config import ControlConfig, MqttConfig, Settings
from essd.domain import BatteryReading, DeviceState, FallbackRung, Plan, Quality
from essd.events import (
    CommandHandled,
    CycleCompleted,
    DaemonStatus,
    DaemonStatusChanged,
    DeviceStateChanged,
    Event,
    EventBus,
    MqttConnectionChanged,
)

__all__ = [
    "SCHEMA_VERSION",
    "BridgeStats",
    "DeviceStatePayload",
    "MqttBridge",
    "PlanPayload",
    "StatePayload",
    "Topics",
    "TotalsPayload",
    "build_device_payload",
    "build_plan_payload",
    "build_state_payload",
    "command_limits",
    "discovery_messages",
    "open_bridge",
]

log = logging.getLogger(__name__)

#: Version of the JSON payloads; bumped on any incompatible change (docs/mqtt.md).
SCHEMA_VERSION = 1

#: Reply to a command received while essd holds no credentials (and no opt-in).
REFUSED_ANONYMOUS = (
    "command: refused, essd is connected anonymously (configure username and password or a "
    "TLS client certificate, or set mqtt.allow_anonymous_control)"
)
#: Reply to a retained command.
REFUSED_RETAINED = "retain: retained commands are never applied (publish with retain false)"
#: Commands a ``standby`` makes moot while they wait in the queue.
_SUPERSEDED_BY_STANDBY = ("mode", "setpoint")


def command_limits(mqtt: MqttConfig, control: ControlConfig) -> CommandLimits:
    """The limits on operator commands: ``[mqtt]``'s, the reserve floor from ``[control]``."""
    return CommandLimits(
        max_manual_duration_s=mqtt.max_manual_duration_s,
        max_manual_power_w=mqtt.max_manual_power_w,
        min_reserve_soc=(
            control.reserve_soc if mqtt.min_reserve_soc is None else mqtt.min_reserve_soc
        ),
    )


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
    fallback_rung: int = Field(description="1 optimal .. 5 safe idle (DESIGN.md ladder)")
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
        ),
    )


def build_plan_payload(site_id: str, plan: Plan) -> PlanPayload:
    """The ``plan`` payload of a dispatch plan."""
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
        **record,
    )


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one site, derived from ``base_topic`` and the site id."""

    base: str
    ha_prefix: str
    site_id: str

    @classmethod
    def of(cls, config: MqttConfig, site_id: str) -> Topics:
        """The topics for ``site_id`` under the configured base."""
        return cls(f"{config.base_topic.rstrip('/')}/{site_id}", config.ha_prefix, site_id)

    @property
    def status(self) -> str:
        """``online``/``offline``, retained; the last will."""
        return f"{self.base}/status"

    @property
    def state(self) -> str:
        """Retained site state."""
        return f"{self.base}/state"

    @property
    def plan(self) -> str:
        """Retained dispatch plan."""
        return f"{self.base}/plan"

    def device(self, device_id: str) -> str:
        """Retained state of one device."""
        return f"{self.base}/device/{device_id}/state"

    def command(self, name: str) -> str:
        """Where command ``name`` is sent."""
        return f"{self.base}/cmd/{name}"

    def result(self, name: str) -> str:
        """Where the result of command ``name`` is published (never retained)."""
        return f"{self.base}/cmd/{name}/result"

    @property
    def commands(self) -> str:
        """The subscription matching every command topic (and not their results)."""
        return f"{self.base}/cmd/+"

    @property
    def ha_status(self) -> str:
        """Home Assistant's birth/last-will topic."""
        return f"{self.ha_prefix}/status"

    @property
    def node_id(self) -> str:
        """Home Assistant node id of this site."""
        return f"essd_{self.site_id}".replace("-", "_")

    def discovery(self, component: str, object_id: str) -> str:
        """Home Assistant discovery config topic of one entity."""
        return f"{self.ha_prefix}/{component}/{self.node_id}/{object_id}/config"


def discovery_messages(
    topics: Topics, device_ids: Iterable[str], *, currency: str = "", version: str = __version__
) -> list[tuple[str, bytes]]:
    """Home Assistant MQTT discovery configs (topic, JSON) for the site and its devices."""
    device = {
        "identifiers": [topics.node_id],
        "name": f"essd {topics.site_id}",
        "manufacturer": "essd",
        "model": "energy storage dispatch",
        "sw_version": version,
    }
    common: dict[str, Any] = {
        "availability_topic": topics.status,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "essd", "sw_version": version},
    }

    def entity(component: str, object_id: str, name: str, **extra: Any) -> tuple[str, bytes]:
        body = {
            "name": name,
            "unique_id": f"{topics.node_id}_{object_id}",
            # HA 2025.10 replaced "object_id" with this (object_id stops working in 2026.4).
            "default_entity_id": f"{component}.{topics.node_id}_{object_id}",
            **common,
            **extra,
        }
        return topics.discovery(component, object_id), json.dumps(body).encode()

    def pct(field: str) -> str:
        # HA's MQTT sensor treats the literal "None" as unknown.
        return (
            f"{{{{ (value_json.{field} * 100) | round(1) "
            f"if value_json.{field} is not none else None }}}}"
        )

    def val(field: str) -> str:
        return f"{{{{ value_json.{field} if value_json.{field} is not none else None }}}}"

    power = {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement"}
    # The totals are durable and only grow: HA's energy dashboard books them as meter readings.
    energy = {
        "unit_of_measurement": "Wh",
        "device_class": "energy",
        "state_class": "total_increasing",
    }
    money: dict[str, Any] = {"state_class": "total"}
    if currency:
        money |= {"unit_of_measurement": currency, "device_class": "monetary"}
    soc = {"unit_of_measurement": "%", "device_class": "battery", "state_class": "measurement"}
    out = [
        entity(
            "sensor",
            "soc",
            "State of charge",
            state_topic=topics.state,
            value_template=pct("soc"),
            **soc,
        ),
        entity(
            "sensor",
            "grid_power",
            "Grid power",
            state_topic=topics.state,
            value_template=val("grid_power_w"),
            **power,
        ),
        entity(
            "sensor",
            "battery_power",
            "Battery power",
            state_topic=topics.state,
            value_template=val("battery_power_w"),
            **power,
        ),
        entity(
            "sensor",
            "cost",
            "Energy cost",
            state_topic=topics.state,
            value_template=val("totals.cost"),
            **money,
        ),
        entity(
            "sensor",
            "imported_energy",
            "Imported energy",
            state_topic=topics.state,
            value_template=val("totals.imported_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "exported_energy",
            "Exported energy",
            state_topic=topics.state,
            value_template=val("totals.exported_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "battery_charged_energy",
            "Battery charged energy",
            state_topic=topics.state,
            value_template=val("totals.battery_charged_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "battery_discharged_energy",
            "Battery discharged energy",
            state_topic=topics.state,
            value_template=val("totals.battery_discharged_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "fallback_rung",
            "Fallback rung",
            state_topic=topics.state,
            value_template="{{ value_json.fallback_rung_name }}",
            entity_category="diagnostic",
        ),
        entity(
            "select",
            "mode",
            "Mode",
            state_topic=topics.state,
            value_template="{{ value_json.mode }}",
            command_topic=topics.command("mode"),
            command_template='{"mode": "{{ value }}"}',
            options=["auto", "manual", "standby"],
        ),
        entity(
            "number",
            "reserve",
            "Reserve",
            state_topic=topics.state,
            value_template="{{ (value_json.reserve_soc * 100) | round(1) }}",
            command_topic=topics.command("reserve"),
            command_template='{"reserve_soc": {{ (value | float / 100) | round(4) }}}',
            min=0,
            max=100,
            step=1,
            unit_of_measurement="%",
            mode="box",
        ),
    ]
    for d in sorted(device_ids):
        out.append(
            entity(
                "sensor",
                f"{d}_power",
                f"{d} power",
                state_topic=topics.device(d),
                value_template=val("power_w"),
                **power,
            )
        )
        out.append(
            entity(
                "sensor",
                f"{d}_soc",
                f"{d} state of charge",
                state_topic=topics.device(d),
                value_template=pct("soc"),
                **soc,
            )
        )
    return out


@dataclass(slots=True)
class BridgeStats:
    """Counters of one bridge since it was created (read them, do not write)."""

    connects_total: int = 0
    connect_failures_total: int = 0
    messages_published_total: int = 0
    commands_total: int = 0
    commands_rejected_total: int = 0
    commands_dropped_total: int = 0
    events_received_total: int = 0


_Dirty = Literal["status", "state", "plan", "discovery"]


class MqttBridge:
    """Publishes bus events over MQTT and feeds commands to the daemon.

    Use as ``async with MqttBridge(...):`` (starts a background task, stops it cleanly with a
    retained ``offline``), or run :meth:`run` in a TaskGroup and call :meth:`stop`.
    ``target`` None makes the bridge read-only (every command is refused). ``limits``
    default to :func:`command_limits` with the default ``[control]`` section.
    """

    def __init__(
        self,
        config: MqttConfig,
        site_id: str,
        bus: EventBus,
        target: CommandTarget | None,
        clock: Clock,
        *,
        currency: str = "",
        rng: random.Random | None = None,
        limits: CommandLimits | None = None,
    ) -> None:
        self._config = config
        self._site_id = site_id
        self._bus = bus
        self._target = target
        self._clock = clock
        self._currency = currency
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.topics = Topics.of(config, site_id)
        self.stats = BridgeStats()
        self.limits = limits or command_limits(config, ControlConfig())
        # Unique per bridge: two processes sharing an id would take each other's session over
        # (and fire each other's "offline" will) in a loop.
        self.client_id = config.client_id or f"essd-{site_id}-{secrets.token_hex(4)}"
        self._commands = CommandQueue(config.command_queue_size)
        # Latest-value cache, written synchronously by the bus handler.
        self._cycle: CycleCompleted | None = None
        self._daemon_status: DaemonStatus | None = None
        # Device id -> (lifecycle state, reason of the last change, time of the newest news).
        self._device_state: dict[str, tuple[DeviceState, str, float]] = {}
        self._dirty: set[_Dirty] = set()
        self._dirty_devices: set[str] = set()
        self._discovered: frozenset[str] | None = None
        self._plan_sent: Plan | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._unsubscribe = bus.subscribe(self._on_event)
        self._task: asyncio.Task[None] | None = None
        self._retained_cmd_warned = False
        self._failing = False

    # ------------------------------------------------------------------ bus side (sync)

    def _on_event(self, event: Event) -> None:
        """Bus subscriber: remember the newest value and wake the sender. Never blocks."""
        self.stats.events_received_total += 1
        if isinstance(event, CycleCompleted):
            self._cycle = event
            for d, s in event.device_states.items():
                old = self._device_state.get(d)
                reason = old[1] if old is not None and old[0] is s else ""
                self._device_state[d] = (s, reason, event.time)
            self._dirty.update(("state", "plan"))
            self._dirty_devices.update(self._device_state)
        elif isinstance(event, DeviceStateChanged):
            self._device_state[event.device_id] = (event.new, event.reason, event.time)
            self._dirty_devices.add(event.device_id)
        elif isinstance(event, DaemonStatusChanged):
            self._daemon_status = event.status
            self._dirty.add("status")
        else:
            return
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while a broker session is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once a broker session is up (use with a timeout)."""
        await self._connected.wait()

    async def __aenter__(self) -> Self:
        """Start the MQTT task."""
        self._task = asyncio.create_task(self.run(), name=f"mqtt-bridge-{self._site_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Publish ``offline``, disconnect and stop the task."""
        await self.stop()

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stop cleanly: publish retained ``offline``, disconnect, unsubscribe from the bus."""
        self._stopping.set()
        self._wake.set()
        self._unsubscribe()
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.warning("MQTT bridge did not stop within %.1f s; cancelling it", timeout_s)
                await self._cancel(task)

    def _backoff_s(self, attempt: int) -> float:
        """Jittered exponential back-off: half to full of min(max, min * 2**attempt)."""
        ceiling = min(
            self._config.reconnect_max_s, self._config.reconnect_min_s * 2.0 ** min(attempt, 30)
        )
        return ceiling * self._rng.uniform(0.5, 1.0)

    def _client(self) -> aiomqtt.Client:
        cfg = self._config
        tls = None
        if cfg.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        v5 = cfg.protocol == "5"
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            keepalive=cfg.keepalive_s,
            tls_params=tls,
            timeout=10.0,
            # Unbounded: a bounded aiomqtt queue drops silently when full (after the broker
            # had its PUBACK). The receive loop empties it at once into the bounded command
            # queue, which answers whatever it has to drop.
            max_queued_incoming_messages=0,
            # Small messages and request/reply commands: do not let Nagle hold them back.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def run(self) -> None:
        """Connect, publish and take commands until :meth:`stop`; reconnect with back-off."""
        for warning in self._config.security_warnings():
            if self._target is not None or "commands" not in warning:
                log.warning("%s", warning)
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with self._client() as client:
                    attempt = 0
                    self.stats.connects_total += 1
                    if self._failing:
                        log.info("MQTT connection to %s:%s restored", *self._addr())
                        self._failing = False
                    else:
                        log.info("MQTT connected to %s:%s", *self._addr())
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.stats.connect_failures_total += 1
                if not self._failing:
                    # Log the transition once, not every retry.
                    log.warning(
                        "MQTT %s:%s unreachable or connection lost (%s); retrying with back-off",
                        *self._addr(),
                        exc,
                    )
                    self._failing = True
            except Exception:
                # A bug here must not end publishing for good (nor reach the control loop).
                self.stats.connect_failures_total += 1
                log.exception("MQTT session failed; reconnecting")
                self._failing = True
            finally:
                if self._connected.is_set():
                    self._connected.clear()
                    self._bus.publish(MqttConnectionChanged(False, self._clock.now()))
            if self._stopping.is_set():
                break
            await self._sleep_unless_stopped(self._backoff_s(attempt))
            attempt += 1

    def _addr(self) -> tuple[str, int]:
        return self._config.host, self._config.port

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        stopper = asyncio.ensure_future(self._stopping.wait())
        if math.isinf(self._clock.speed):
            # A stepped simulated clock does not wait: its sleep would jump simulated time for
            # the whole daemon. The back-off is about a real broker, so wait in real time.
            try:
                await asyncio.wait({stopper}, timeout=seconds)
            finally:
                stopper.cancel()
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, stopper):
                t.cancel()

    def _status_payload(self) -> bytes:
        stopping = self._daemon_status in (DaemonStatus.STOPPING, DaemonStatus.OFFLINE)
        return b"offline" if stopping or self._stopping.is_set() else b"online"

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool, qos: int = 0
    ) -> None:
        await client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.messages_published_total += 1

    async def _session(self, client: aiomqtt.Client) -> None:
        """One broker session: subscribe, announce, then send and receive until stop.

        ``online`` is announced only once the command subscription is in place, so a command
        sent by anyone who sees ``online`` is never lost.
        """
        if self._config.protocol == "5":
            # Retain-as-published: a retained command keeps its flag even when delivered live.
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            await client.subscribe(self.topics.commands, options=options)
        else:
            await client.subscribe(self.topics.commands, qos=1)
        if self._config.ha_discovery:
            await client.subscribe(self.topics.ha_status, qos=1)
        await self._publish(client, self.topics.status, self._status_payload(), retain=True, qos=1)
        # A new session (the broker may have lost its retained store): republish everything.
        self._dirty.update(("state", "plan", "discovery"))
        self._dirty_devices.update(self._device_state)
        self._discovered = None
        self._plan_sent = None
        self._wake.set()
        self._connected.set()
        self._bus.publish(MqttConnectionChanged(True, self._clock.now()))
        send = asyncio.create_task(self._send_loop(client), name="mqtt-send")
        receive = asyncio.create_task(self._receive_loop(client), name="mqtt-receive")
        command = asyncio.create_task(self._command_loop(client), name="mqtt-commands")
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop")
        tasks = {send, receive, command, stop}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Cancelled without stop(): still leave a retained "offline" if we can.
            await self._cancel(*tasks)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topics.status, b"offline", qos=1, retain=True, timeout=1)
            raise
        await self._cancel(*tasks)
        for t in done:
            error = None if t is stop else t.exception()
            if error is not None:
                raise error  # the session ended on a broken connection (or a bug)
        # Clean stop: flush the newest values, then "offline" (a clean disconnect fires no will).
        for topic, payload, retain in self._drain():
            await self._publish(client, topic, payload, retain=retain)
        await self._publish(client, self.topics.status, b"offline", retain=True, qos=1)

    @staticmethod
    async def _cancel(*tasks: asyncio.Task[Any]) -> None:
        # Cancel until done: on Python 3.11 asyncio.wait_for (used inside aiomqtt) can swallow
        # a cancellation that races with its inner future completing, and a loop task would
        # then carry on; one retry is all it takes.
        pending = {t for t in tasks if not t.done()}
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for t in tasks:
            if not t.cancelled():
                t.exception()  # retrieved, so asyncio does not log it as never retrieved

    def _drain(self) -> Iterator[tuple[str, bytes, bool]]:
        """Build the payloads of everything that changed since the last drain (newest only)."""
        dirty, self._dirty = self._dirty, set()
        devices, self._dirty_devices = self._dirty_devices, set()
        cycle = self._cycle
        if "status" in dirty:
            yield self.topics.status, self._status_payload(), True
        if cycle is not None and "state" in dirty:
            yield self.topics.state, build_state_payload(self._site_id, cycle).to_payload(), True
        # A plan is re-sent only when the core produced a new one (it is the largest payload).
        if cycle is not None and "plan" in dirty and cycle.plan is not self._plan_sent:
            self._plan_sent = cycle.plan
            yield self.topics.plan, build_plan_payload(self._site_id, cycle.plan).to_payload(), True
        for d in sorted(devices):
            state, reason, when = self._device_state[d]
            payload = build_device_payload(
                self._site_id, d, time=when, state=state, reason=reason, cycle=cycle
            )
            yield self.topics.device(d), payload.to_payload(), True
        if self._config.ha_discovery:
            # Per-device power/SoC entities exist for storage units only (not the meter).
            known = frozenset(cycle.snapshot.batteries) if cycle is not None else frozenset()
            if "discovery" in dirty or known != self._discovered:
                self._discovered = known
                for topic, body in discovery_messages(self.topics, known, currency=self._currency):
                    yield topic, body, True

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            for topic, payload, retain in self._drain():
                await self._publish(client, topic, payload, retain=retain)

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        """Move each message into the command queue at once; never waits on the network."""
        prefix = self.topics.command("")
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic == self.topics.ha_status:
                if payload == b"online":
                    # Home Assistant (re)started: send discovery and the current state again.
                    self._dirty.update(("state", "plan", "discovery"))
                    self._dirty_devices.update(self._device_state)
                    self._wake.set()
                continue
            if topic.startswith(prefix):
                self._receive_command(topic[len(prefix) :], payload, retained=message.retain)

    def _receive_command(self, name: str, payload: bytes, *, retained: bool) -> None:
        """Classify one command: refuse it, apply it now (standby), or queue it."""
        if retained:
            # A retained command would be re-applied on every reconnect: never act on one.
            if not self._retained_cmd_warned:
                log.warning("ignoring retained MQTT command on cmd/%s (send it unretained)", name)
                self._retained_cmd_warned = True
            self._queue(name, CommandResult(ok=False, error=REFUSED_RETAINED, id=echo_id(payload)))
            return
        if self._target is not None and not self._config.commands_enabled:
            self._queue(name, CommandResult(ok=False, error=REFUSED_ANONYMOUS, id=echo_id(payload)))
            return
        command = read_command(name, payload)
        if is_safety_command(command):
            # Standby wins: applied on arrival, and nothing older still queued can undo it.
            assert isinstance(command, CommandModel)
            dropped = self._commands.supersede(_SUPERSEDED_BY_STANDBY)
            self.stats.commands_dropped_total += dropped
            self._commands.reply(name, self._apply(name, command))
            return
        self._queue(name, command)

    def _queue(self, name: str, command: CommandModel | CommandResult) -> None:
        if not self._commands.put(name, command):
            self.stats.commands_dropped_total += 1
            if self.stats.commands_dropped_total == 1:
                log.warning(
                    "MQTT command queue full (%d): dropping the oldest commands, answered "
                    "'dropped'",
                    self._commands.maxsize,
                )

    def _apply(self, name: str, command: CommandModel) -> CommandResult:
        result = apply_command(command, self._target, now=self._clock.now(), limits=self.limits)
        if result.ok:
            log.info("MQTT command %s applied", name)
        return result

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        """Apply queued commands one at a time, in order, and send every reply."""
        while True:
            item = await self._commands.get()
            command = item.command
            result = (
                command if isinstance(command, CommandResult) else self._apply(item.name, command)
            )
            self.stats.commands_total += 1
            if not result.ok:
                self.stats.commands_rejected_total += 1
                log.debug("MQTT command %s refused: %s", item.name, result.error)
            self._bus.publish(
                CommandHandled(
                    name=item.name, ok=result.ok, error=result.error, time=self._clock.now()
                )
            )
            await self._publish(
                client, self.topics.result(item.name), result.to_payload(), retain=False, qos=1
            )


@contextlib.asynccontextmanager
async def open_bridge(
    settings: Settings, bus: EventBus, target: CommandTarget | None, clock: Clock
) -> AsyncIterator[MqttBridge | None]:
    """A running :class:`MqttBridge` for ``settings`` (None when ``[mqtt]`` is not configured).

    Stops it cleanly (retained ``offline``) on exit.
    """
    if settings.mqtt is None:
        yield None
        return
    bridge = MqttBridge(
        settings.mqtt,
        settings.site.id,
        bus,
        target,
        clock,
        currency=settings.tariff.currency,
        limits=command_limits(settings.mqtt, settings.control),
    )
    async with bridge:
        yield bridge
