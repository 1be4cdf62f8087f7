"""Domain types that cross boundaries between essd's parts.

Sign conventions (the one place they are defined; every field doc repeats them):

- **Battery/PCS active power, W: > 0 discharges into the site, < 0 charges.**
- **Grid power at the point of connection, W: > 0 imports, < 0 exports.**
- Energy in Wh; state of charge (SoC) as a ratio 0..1.
- Timestamps named ``*_mono`` are seconds on :meth:`essd.clock.Clock.monotonic`; timestamps
  named ``time``/``*_at`` without suffix are epoch seconds from :meth:`essd.clock.Clock.now`.

All types are frozen: a value handed from one phase of the cycle to the next cannot change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum


class DeviceClass(StrEnum):
    """What kind of unit a profile describes; capabilities differ by class."""

    INDUSTRIAL = "industrial"  # PCS + BMS with a W setpoint, live limits, heartbeat, revert timer
    HOUSEHOLD = "household"  # hybrid inverter: mode register + power register
    PORTABLE = "portable"  # camping power station: charge-rate limit, output switches, may vanish
    METER = "meter"  # grid meter at the point of connection


class Quality(StrEnum):
    """How far a value can be trusted."""

    GOOD = "good"
    STALE = "stale"  # read successfully, but too long ago (or frozen registers)
    INVALID = "invalid"  # read, but "not implemented", NaN or outside the physical range
    MISSING = "missing"  # not read at all (timeout, exception, unplugged)


@dataclass(frozen=True, slots=True)
class Reading:
    """One value read from a device, with its age and validity.

    ``value`` is None unless the quality is GOOD or STALE; ``reason`` says why not.
    """

    value: float | None
    unit: str
    read_at_mono: float
    quality: Quality = Quality.GOOD
    reason: str = ""

    @classmethod
    def good(cls, value: float, unit: str, read_at_mono: float) -> Reading:
        """A valid reading; a non-finite value becomes INVALID instead."""
        if not math.isfinite(value):
            return cls(None, unit, read_at_mono, Quality.INVALID, f"non-finite value {value!r}")
        return cls(float(value), unit, read_at_mono)

    @classmethod
    def bad(cls, unit: str, read_at_mono: float, quality: Quality, reason: str) -> Reading:
        """A reading without a usable value."""
        return cls(None, unit, read_at_mono, quality, reason)

    @property
    def valid(self) -> bool:
        """True when the value is present and trustworthy."""
        return self.quality is Quality.GOOD and self.value is not None

    def age(self, now_mono: float) -> float:
        """Seconds since the value was read."""
        return max(0.0, now_mono - self.read_at_mono)


@dataclass(frozen=True, slots=True)
class LiveLimits:
    """Power a battery accepts right now (from the BMS, the profile and the config), W >= 0.

    Both are magnitudes: ``max_charge_w`` bounds charging (power_w >= -max_charge_w),
    ``max_discharge_w`` bounds discharging (power_w <= max_discharge_w).
    """

    max_charge_w: float
    max_discharge_w: float

    def __post_init__(self) -> None:
        for name in ("max_charge_w", "max_discharge_w"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {v!r}")

    def clamp(self, power_w: float) -> float:
        """``power_w`` (battery sign) limited to [-max_charge_w, max_discharge_w]."""
        return min(max(power_w, -self.max_charge_w), self.max_discharge_w)

    def tighten(self, other: LiveLimits) -> LiveLimits:
        """The stricter of two limits, per direction."""
        return LiveLimits(
            min(self.max_charge_w, other.max_charge_w),
            min(self.max_discharge_w, other.max_discharge_w),
        )


class DeviceState(StrEnum):
    """A device's lifecycle as the daemon sees it; transitions are logged, states are not."""

    CONNECTING = "connecting"
    RUNNING = "running"
    DEGRADED = "degraded"  # stale or invalid data: held at safe idle until it recovers
    FAULT = "fault"  # the device reports a fault (alarm word, BMS limits at 0)
    WRITE_FAILED = "write_failed"  # answers reads but refuses or loses writes: not controlled
    SAFE = "safe"  # deliberately in safe mode (stop, standby command)


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """Everything read from one storage unit in one cycle.

    ``power_w``: > 0 discharges into the site, < 0 charges. ``soc`` is a ratio 0..1.
    ``limits`` are the live BMS limits (None when the device does not report any).
    ``available`` is False when the unit did not answer (unplugged portable, link down).
    """

    device_id: str
    device_class: DeviceClass
    read_at_mono: float
    available: bool
    soc: Reading
    power_w: Reading
    limits: LiveLimits | None
    capacity_wh: float
    alarms: tuple[str, ...] = ()
    extras: Mapping[str, Reading] = field(default_factory=dict)
    # States and alarm bits of severity "warning": reported, the device stays under control
    # (only ``alarms``, severity "fault", fault it).
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MeterReading:
    """The grid meter at the point of connection. ``grid_power_w`` > 0 imports, < 0 exports."""

    device_id: str
    read_at_mono: float
    grid_power_w: Reading


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The frozen process image of one cycle: what every device said, and when."""

    time: float
    mono: float
    batteries: Mapping[str, BatteryReading]
    meter: MeterReading | None


@dataclass(frozen=True, slots=True)
class Setpoint:
    """A command for one device, valid until ``expires_at_mono``.

    ``power_w``: > 0 discharges into the site, < 0 charges (0 = idle).
    ``output_enabled``: for units with output switches (portable); None leaves them alone.
    """

    device_id: str
    power_w: float
    issued_at_mono: float
    ttl_s: float
    source: str
    output_enabled: bool | None = None

    @property
    def expires_at_mono(self) -> float:
        """When the device must no longer act on this setpoint."""
        return self.issued_at_mono + self.ttl_s

    def expired(self, now_mono: float) -> bool:
        """True once the time-to-live has run out."""
        return now_mono >= self.expires_at_mono


class FallbackRung(IntEnum):
    """The fallback ladder (docs/architecture.md); a higher number is a worse rung."""

    OPTIMAL = 1  # optimal solve within the time budget
    SOFT = 2  # solved, but with soft-constraint slack > 0
    LAST_PLAN = 3  # last valid plan, shifted to now
    RULE_BASED = 4  # rule-based self-consumption within limits
    SAFE_IDLE = 5  # 0 W or the device's safe mode


class PlanCause(StrEnum):
    """Why the plan in force was made: the typed provenance of every plan (never parsed text).

    The values are the ``reason`` label of ``essd_plan_reason`` and the ``cause`` field of the
    MQTT plan and state payloads; the plan's free-text ``reason`` adds detail for people.
    """

    OPTIMAL = "optimal"  # rung 1
    SOFT_CONSTRAINTS = "soft_constraints"  # rung 2: solved with slack
    SOLVER_TIMEOUT = "solver_timeout"  # the solver ran out of its budget
    SOLVER_STATUS = "solver_status"  # the solver ended without an optimal solution
    SOLVER_ERROR = "solver_error"  # the solver raised
    SOLVE_LATE = "solve_late"  # the solve thread did not answer within the budget
    SOLVE_BUSY = "solve_busy"  # the previous solve was still running
    INVALID_INPUTS = "invalid_inputs"  # dispatch inputs failed validation
    FORECAST_FAILED = "forecast_failed"  # the forecast phase raised
    FORECAST_INVALID = "forecast_invalid"  # a forecast held non-finite or impossible values
    DECIDE_FAILED = "decide_failed"  # the decide phase raised
    PLAN_INVALID = "plan_invalid"  # a plan with non-finite setpoints was refused
    GUARD_FAILED = "guard_failed"  # the safety guard raised: everything idles
    STALE_DATA = "stale_data"  # no valid meter reading: site limits cannot be verified
    METER_IMPLAUSIBLE = "meter_implausible"  # the meter reading is not credible
    NO_BATTERY = "no_battery"  # nothing to dispatch
    MANUAL = "manual"  # operator setpoints
    STANDBY = "standby"  # operator standby: safe mode everywhere


@dataclass(frozen=True, slots=True)
class Plan:
    """A dispatch plan over the horizon; only its first step is applied.

    ``power_w[device][t]``: > 0 discharges, < 0 charges, for step t (length = steps).
    ``soc[device][t]``: predicted SoC ratio at the start of step t (length = steps + 1).
    ``grid_w[t]``: predicted grid power, > 0 imports.
    ``import_price[t]``/``export_price[t]``: the prices per kWh the plan was optimized against
    (empty when the producer does not record them).
    ``session_power_w[session][t]``: flexible loads (EV sessions, swap packs), battery sign
    (< 0 charges the vehicle, > 0 is V2G); empty when the plan has none (lower rungs).
    """

    created_at: float
    step_s: float
    device_ids: tuple[str, ...]
    power_w: Mapping[str, tuple[float, ...]]
    soc: Mapping[str, tuple[float, ...]]
    grid_w: tuple[float, ...]
    objective: float
    solver_status: str
    rung: FallbackRung
    reason: str
    cause: PlanCause
    slack: Mapping[str, float] = field(default_factory=dict)
    solve_s: float = 0.0
    import_price: tuple[float, ...] = ()
    export_price: tuple[float, ...] = ()
    session_power_w: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of steps in the horizon."""
        return len(self.grid_w)

    def with_cause(self, rung: FallbackRung, cause: PlanCause, reason: str) -> Plan:
        """The same plan, made on another rung for another cause."""
        return replace(self, rung=rung, cause=cause, reason=reason)

    def finite(self) -> bool:
        """True when every first-step setpoint is a finite number."""
        return all(p and math.isfinite(p[0]) for p in self.power_w.values())

    def first_step_w(self, device_id: str) -> float:
        """The power to apply now for ``device_id`` (battery sign)."""
        return self.power_w[device_id][0]

    def covers(self, time: float) -> bool:
        """True while ``time`` falls inside the plan's horizon."""
        return self.created_at <= time < self.created_at + self.steps * self.step_s

    def shifted_to(
        self, time: float, *, rung: FallbackRung, reason: str, cause: PlanCause
    ) -> Plan | None:
        """The remainder of this plan from the step containing ``time``, or None when expired."""
        if not self.covers(time):
            return None
        k = int((time - self.created_at) // self.step_s)
        return Plan(
            created_at=self.created_at + k * self.step_s,
            step_s=self.step_s,
            device_ids=self.device_ids,
            power_w={d: p[k:] for d, p in self.power_w.items()},
            soc={d: s[k:] for d, s in self.soc.items()},
            grid_w=self.grid_w[k:],
            objective=self.objective,
            solver_status=self.solver_status,
            rung=rung,
            reason=reason,
            cause=cause,
            slack=self.slack,
            solve_s=0.0,
            import_price=self.import_price[k:],
            export_price=self.export_price[k:],
        )
