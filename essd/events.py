"""The one channel through which values leave the control core.

The cycle engine publishes frozen events on an :class:`EventBus`; the metrics exporter, the MQTT
publisher and the terminal view subscribe. Control logic never calls them directly, and a
failing subscriber never breaks a cycle (its exception is logged once per subscriber and kind).
Subscribers run synchronously in the event loop and must not block: one that does I/O hands the
event to its own queue.

Sign conventions: battery W > 0 discharges, < 0 charges; grid W > 0 imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from essd.counters import DeviceCounters
from essd.domain import DeviceClass, DeviceState, Plan, PlanCause, Setpoint, Snapshot

if TYPE_CHECKING:
    from essd.credibility import CredibilityReport


log = logging.getLogger(__name__)


class Event:
    """Base class of every published event (all are frozen dataclasses)."""


@dataclass(frozen=True, slots=True)
class SiteTotals:
    """Cumulative site figures, integrated from the meter each cycle and kept in the durable
    state, so they only ever grow (Home Assistant's ``total_increasing``).

    ``battery_charged_wh``/``battery_discharged_wh`` integrate the units' measured AC power;
    ``pv_wh`` the PV the units measure themselves (0 where none does). ``savings`` is what the
    batteries saved so far: the cost the site would have paid with every battery idle (grid
    power + battery power, at the same prices and carbon price) minus the cost it paid; it is
    negative while they have cost more than they saved (charging ahead of a peak, losses).
    The demand charge is not part of ``cost`` or ``savings``: see ``billing_peak_w``.
    """

    imported_wh: float = 0.0
    exported_wh: float = 0.0
    cost: float = 0.0  # in the tariff currency: energy (import - export) + carbon price
    co2_kg: float = 0.0
    battery_charged_wh: float = 0.0
    battery_discharged_wh: float = 0.0
    pv_wh: float = 0.0
    savings: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """The envelope in force for one unit this cycle, as the guard enforced it.

    SoC window as ratios 0..1 (reserve includes an operator override); power limits are W
    magnitudes after the live BMS limits were applied (0 when the unit cannot move that way).
    """

    reserve_soc: float
    max_soc: float
    max_charge_w: float
    max_discharge_w: float


class WriteStatus(StrEnum):
    """What the write phase did for one unit this cycle."""

    WRITTEN = "written"  # a setpoint was written and accepted
    HELD = "held"  # the setpoint in force is unchanged and no refresh was due
    FAILED = "failed"  # a write was attempted and refused or lost
    SAFE_MODE = "safe_mode"  # the unit's safe mode is in force (written now or before)
    SKIPPED = "skipped"  # not controlled this cycle (not answering: its own timer reverts it)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """The write phase's result for one unit.

    ``power_w``: the setpoint the unit last accepted (battery sign), None before the first or
    after safe mode; ``accepted_at_mono``: when that write was accepted (clock monotonic s);
    ``error``: the last failure this cycle; ``consecutive_failures`` counts failed cycles.
    """

    status: WriteStatus
    power_w: float | None = None
    accepted_at_mono: float | None = None
    error: str = ""
    consecutive_failures: int = 0


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """What happened to one storage unit in one cycle: the one source for every consumer.

    ``requested_w``: what the plan or operator asked (battery sign: > 0 discharges);
    ``setpoint_w``: what the guard let through; ``guard_reasons``: why they differ;
    ``setpoint_age_s``: seconds since the last *accepted* write (None before the first).
    """

    device_id: str
    device_class: DeviceClass
    state: DeviceState
    reason: str
    limits: DeviceLimits | None
    requested_w: float
    setpoint_w: float
    guard_reasons: tuple[str, ...]
    write: WriteOutcome
    setpoint_age_s: float | None
    credible: bool = True  # False while the credibility screen holds the unit at 0 W
    credibility: str = ""  # why not: "<cause>: <detail>"
    # AC energy into / out of this unit, integrated from its measured power; durable.
    charged_wh: float = 0.0
    discharged_wh: float = 0.0


@dataclass(frozen=True, slots=True)
class ForecastRecord:
    """The forecast the plan was made against, per step from ``start`` (epoch s).

    ``load_w`` is the load the optimizer saw (net of PV where PV is not measured apart),
    ``pv_w`` the PV forecast (zeros where none is made), carbon in g/kWh.
    """

    start: float
    step_s: float
    load_w: tuple[float, ...]
    pv_w: tuple[float, ...]
    carbon_g_per_kwh: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class SwapStatus:
    """A swap station's cycle: ``packs_ready`` charged packs (SoC >= target) of ``packs``
    readable, against ``service_level``; swaps seen since start, the learned demand now."""

    packs_ready: int
    packs: int
    service_level: int
    swaps_total: int
    demand_per_hour: float

    @property
    def held(self) -> bool:
        """True when at least ``service_level`` charged packs are ready."""
        return self.packs_ready >= self.service_level


@dataclass(frozen=True, slots=True)
class CycleCompleted(Event):
    """One control cycle, every phase done.

    ``phase_s`` maps phase name (read, snapshot, forecast, decide, guard, write, publish) to
    seconds. ``setpoints`` are what the guard let through (battery sign); ``devices`` is the
    per-unit record (envelope, state, request, guard reasons, write outcome) that metrics,
    MQTT, the terminal view and HIL read; ``phase_errors`` maps a phase that failed to its
    error (the cycle went on: see ``plan.cause``). ``predicted_grid_w`` is the guard's
    prediction after the new setpoints and ``site_limit_unmet_w`` how far a site limit stays
    exceeded when no unit has headroom left. ``wall_step_s`` is a wall-clock step detected
    this cycle (0 when none). ``solver_failures_consecutive`` counts solves in a row that
    failed (not mere budget overruns) and ``solver_rebuilds_total`` how often the solver was
    rebuilt cold because of such a streak.
    ``credibility``: which unit readings and which meter reading the guard believed, and why
    not (None from producers that do not judge credibility).
    ``pv_power_w``: PV measured by the units themselves (None where none does);
    ``net_load_w``: the site's consumption less unmeasured PV, from the meter and the units
    (grid + battery + measured PV; None without a valid meter reading);
    ``billing_peak_w``: the billing period's running peak of the per-step average import (what
    the demand charge is billed on); ``forecast``: what the plan was made against.
    """

    cycle: int
    time: float
    duration_s: float
    period_s: float
    overrun: bool
    overruns_total: int
    phase_s: Mapping[str, float]
    snapshot: Snapshot
    plan: Plan
    setpoints: Mapping[str, Setpoint]
    device_states: Mapping[str, DeviceState]
    device_counters: Mapping[str, DeviceCounters]
    grid_power_w: float | None
    import_limit_w: float
    export_limit_w: float
    import_price: float
    export_price: float
    carbon_intensity_g_per_kwh: float
    totals: SiteTotals
    mode: str  # auto | manual | standby
    reserve_soc: float
    devices: Mapping[str, DeviceRecord] = field(default_factory=dict)
    predicted_grid_w: float | None = None
    site_limit_unmet_w: float = 0.0
    phase_errors: Mapping[str, str] = field(default_factory=dict)
    wall_step_s: float = 0.0
    solver_failures_consecutive: int = 0
    solver_rebuilds_total: int = 0
    credibility: CredibilityReport | None = None
    pv_power_w: float | None = None
    net_load_w: float | None = None
    billing_peak_w: float = 0.0
    forecast: ForecastRecord | None = None
    # EV chargers: the limit (W) sent to each this cycle (empty when none was sent).
    charger_limits_w: Mapping[str, float] = field(default_factory=dict)
    # Battery-swap station (essd.swapsite): packs ready vs the service level; None elsewhere.
    swap: SwapStatus | None = None

    @property
    def cause(self) -> PlanCause:
        """Why the plan in force was made."""
        return self.plan.cause


@dataclass(frozen=True, slots=True)
class DeviceStateChanged(Event):
    """A device's lifecycle state changed (logged once, not every cycle)."""

    device_id: str
    old: DeviceState
    new: DeviceState
    reason: str
    time: float


class DaemonStatus(StrEnum):
    """The daemon's own lifecycle."""

    STARTING = "starting"
    ONLINE = "online"
    STOPPING = "stopping"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DaemonStatusChanged(Event):
    """The daemon started, became ready, is stopping or stopped."""

    status: DaemonStatus
    time: float


@dataclass(frozen=True, slots=True)
class CommandHandled(Event):
    """An operator command (MQTT, CLI) was applied or refused; ``error`` names the field."""

    name: str
    ok: bool
    error: str
    time: float


@dataclass(frozen=True, slots=True)
class MqttConnectionChanged(Event):
    """The MQTT client connected to or lost its broker (published by the MQTT publisher)."""

    connected: bool
    time: float


@dataclass(frozen=True, slots=True)
class OnlineForecastStatus(Event):
    """One fetch of an online forecast source (published by :mod:`essd.online`): ``ok`` its
    outcome, ``failures`` the failed fetches since the last good one, ``last_success`` and
    ``covers_until`` epoch s (None: never)."""

    source: str
    ok: bool
    failures: int
    last_success: float | None
    covers_until: float | None
    time: float


Handler = Callable[[Event], None]


class EventBus:
    """Synchronous publish/subscribe; a subscriber's failure is isolated and logged once."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []
        self._failed: set[tuple[int, str]] = set()

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Register ``handler``; returns a function that unsubscribes it."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    def publish(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber, in subscription order."""
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                key = (id(handler), type(event).__name__)
                if key not in self._failed:
                    self._failed.add(key)
                    log.exception("event subscriber %r failed on %s", handler, key[1])
