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

from essd.domain import DeviceState, Plan, Setpoint, Snapshot

if TYPE_CHECKING:
    from essd.credibility import CredibilityReport

__all__ = [
    "CommandHandled",
    "CycleCompleted",
    "DaemonStatus",
    "DaemonStatusChanged",
    "DeviceCounters",
    "DeviceStateChanged",
    "Event",
    "EventBus",
    "Handler",
    "MqttConnectionChanged",
    "SiteTotals",
]

log = logging.getLogger(__name__)


class Event:
    """Base class of every published event (all are frozen dataclasses)."""


@dataclass(frozen=True, slots=True)
class DeviceCounters:
    """Cumulative per-device communication counters (since start)."""

    requests_total: int = 0
    errors_total: Mapping[str, int] = field(default_factory=dict)  # by kind: timeout, exception...
    writes_total: int = 0
    readback_mismatches_total: int = 0
    last_latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class SiteTotals:
    """Cumulative site figures since start, integrated from the meter each cycle."""

    imported_wh: float = 0.0
    exported_wh: float = 0.0
    cost: float = 0.0  # in the tariff currency: energy (import - export) + carbon price
    co2_kg: float = 0.0


@dataclass(frozen=True, slots=True)
class CycleCompleted(Event):
    """One control cycle, every phase done.

    ``phase_s`` maps phase name (read, snapshot, forecast, decide, guard, write, publish) to
    seconds. ``setpoints`` are what the guard let through and was written (battery sign).
    ``credibility``: which unit readings and which meter reading the guard believed, and why
    not (None from producers that do not judge credibility).
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
    credibility: CredibilityReport | None = None


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
