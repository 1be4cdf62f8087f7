"""The Prometheus exporter: subscribes to the event bus and keeps the metrics of its registry.

Histograms and counters are updated per event; current values are rendered at scrape time by
:mod:`essd.metrics.live`. Names, units and sign conventions: see :mod:`essd.metrics`.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from essd import __version__
from essd.clock import Clock
from essd.domain import FallbackRung
from essd.events import (
    CommandHandled,
    CycleCompleted,
    DaemonStatusChanged,
    DeviceStateChanged,
    Event,
    EventBus,
    MqttConnectionChanged,
    OnlineForecastStatus,
)
from essd.metrics.energy import EnergyCollector
from essd.metrics.http import ExpositionCache
from essd.metrics.labels import (
    COMMANDS,
    CYCLE_PHASES,
    ERROR_KINDS,
    SOLVER_FAILURE_CAUSES,
    SOLVER_STATUSES,
    BoundedLabel,
    solver_failure_cause,
)
from essd.metrics.live import ExporterState, LiveCollector, finite

if TYPE_CHECKING:
    from essd.config import Settings


# Cycle periods are 1..300 s; a cycle normally takes tens of milliseconds to a few seconds.
_CYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# The solve budget is at most 60 s (ControlConfig.solve_budget_s), 2 s by default.
_SOLVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


# Cycle phases and Modbus requests: TCP answers in milliseconds; RTU at 9600 baud and timeouts
# (<= 10 s) take longer.
_SHORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class MetricsExporter:
    """Turns bus events into Prometheus metrics in a registry of its own.

    Subscribe it with :meth:`attach` (or pass :meth:`handle` to ``EventBus.subscribe``).
    ``clock`` must be the daemon's clock: setpoint and cycle ages are measured on it.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        site_id: str = "",
        currency: str = "",
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
        commands: Iterable[str] = COMMANDS,
        mqtt_enabled: bool = False,
    ) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        # With MQTT configured, "not connected" is the truth until the client says otherwise.
        self._state = ExporterState(mqtt_connected=False if mqtt_enabled else None)
        self._lock = threading.Lock()  # serializes writers; readers take the reference only
        self._phase = BoundedLabel(CYCLE_PHASES, extra=0)
        self.error_kind = BoundedLabel(ERROR_KINDS, extra=12)
        commands = tuple(commands)
        self._command = BoundedLabel(commands, extra=24)
        self.solver_status = BoundedLabel(SOLVER_STATUSES, extra=0)
        r = self.registry

        if process_metrics:
            # process_* (CPU, memory, fds, start time from /proc) and python_info.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        Info("essd_build", "essd build information.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        if site_id or currency:
            Info("essd_site", "The site this essd controls.", registry=r).info(
                {"site": site_id, "currency": currency}
            )

        self.cycle_duration = Histogram(
            "essd_cycle_duration_seconds",
            "Duration of a control cycle, all phases.",
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.phase_duration = Histogram(
            "essd_cycle_phase_duration_seconds",
            "Duration of one phase of a control cycle.",
            ["phase"],
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        for phase in CYCLE_PHASES:
            self.phase_duration.labels(phase)
        self.solve_duration = Histogram(
            "essd_solve_duration_seconds",
            "Wall time of a dispatch solve whose plan was used (fallback rungs 1 and 2).",
            buckets=_SOLVE_BUCKETS,
            registry=r,
        )
        self.modbus_latency = Histogram(
            "essd_device_modbus_latency_seconds",
            "Latency of a device's last Modbus request, sampled once per control cycle.",
            ["device"],
            buckets=_SHORT_BUCKETS,
            registry=r,
        )
        self.rung_cycles = Counter(
            "essd_plan_rung_cycles_total",
            "Control cycles by the fallback rung of the plan in force (1 optimal .. 5 safe idle).",
            ["rung"],
            registry=r,
        )
        for rung in FallbackRung:
            self.rung_cycles.labels(str(int(rung)))
        self.solver_failures = Counter(
            "essd_solver_failures_total",
            "Cycles in which the solve failed and a fallback plan was used, by cause.",
            ["cause"],
            registry=r,
        )
        for cause in SOLVER_FAILURE_CAUSES:
            self.solver_failures.labels(cause)
        self.device_transitions = Counter(
            "essd_device_state_changes_total",
            "Device lifecycle transitions, by the state entered.",
            ["device", "state"],
            registry=r,
        )
        self.commands = Counter(
            "essd_commands_total",
            "Operator commands handled, by command and result (ok or refused).",
            ["command", "result"],
            registry=r,
        )
        for name in commands:
            for result in ("ok", "refused"):
                self.commands.labels(name, result)
        r.register(LiveCollector(self))
        r.register(EnergyCollector(self))
        #: What the HTTP endpoint serves: this registry, rendered at most once per cycle.
        self.exposition_cache = ExpositionCache(r, clock=clock)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Clock, registry: CollectorRegistry | None = None
    ) -> MetricsExporter:
        """An exporter for the configured site: site id, currency, MQTT or not."""
        return cls(
            clock=clock,
            site_id=settings.site.id,
            currency=settings.tariff.currency,
            registry=registry,
            mqtt_enabled=settings.mqtt is not None,
        )

    @property
    def state(self) -> ExporterState:
        """The values the next scrape renders (read-only)."""
        return self._state

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Subscribe to ``bus``; returns the function that unsubscribes."""
        return bus.subscribe(self.handle)

    def handle(self, event: Event) -> None:
        """Bus subscriber: update the metrics from one event (cheap, never blocks)."""
        if isinstance(event, CycleCompleted):
            self._on_cycle(event)
            self.exposition_cache.cycle_completed()
        elif isinstance(event, DeviceStateChanged):
            self.device_transitions.labels(event.device_id, event.new.value).inc()
            with self._lock:
                states = {**self._state.device_states, event.device_id: event.new}
                self._state = replace(self._state, device_states=states)
        elif isinstance(event, DaemonStatusChanged):
            with self._lock:
                self._state = replace(self._state, daemon_status=event.status)
        elif isinstance(event, CommandHandled):
            result = "ok" if event.ok else "refused"
            self.commands.labels(self._command(event.name), result).inc()
        elif isinstance(event, MqttConnectionChanged):
            self.set_mqtt_connected(event.connected)
        elif isinstance(event, OnlineForecastStatus):
            with self._lock:
                online = {**self._state.online, event.source: event}
                self._state = replace(self._state, online=online)

    def set_mqtt_connected(self, connected: bool) -> None:
        """Record the MQTT connection state (also driven by ``MqttConnectionChanged``)."""
        with self._lock:
            self._state = replace(self._state, mqtt_connected=connected)

    def exposition(self) -> bytes:
        """The registry rendered now in the Prometheus text format (the HTTP endpoint serves
        the same, cached per cycle by :attr:`exposition_cache`)."""
        return generate_latest(self.registry)

    def _on_cycle(self, ev: CycleCompleted) -> None:
        self.cycle_duration.observe(max(0.0, ev.duration_s))
        for phase, seconds in ev.phase_s.items():
            if finite(seconds):
                self.phase_duration.labels(self._phase(phase)).observe(max(0.0, seconds))
        plan = ev.plan
        if plan.rung <= FallbackRung.SOFT and finite(plan.solve_s) and plan.solve_s > 0:
            self.solve_duration.observe(plan.solve_s)
        self.rung_cycles.labels(str(int(plan.rung))).inc()
        cause = solver_failure_cause(plan)
        if cause is not None:
            self.solver_failures.labels(cause).inc()
        for dev, counters in ev.device_counters.items():
            if finite(counters.last_latency_s):
                assert counters.last_latency_s is not None
                self.modbus_latency.labels(dev).observe(max(0.0, counters.last_latency_s))
        with self._lock:
            self._state = replace(
                self._state,
                cycle=ev,
                # A device missing from this cycle's setpoints keeps its last one: its age
                # then grows past the TTL, which is exactly what the alert is about.
                setpoints={**self._state.setpoints, **ev.setpoints},
                device_states={**self._state.device_states, **ev.device_states},
            )
