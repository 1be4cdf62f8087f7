"""Prometheus metrics: an exporter fed by the event bus, and its HTTP endpoint.

The control core never calls this module: :class:`MetricsExporter` subscribes to the
:class:`~essd.events.EventBus` and turns events into metrics in its own
:class:`~prometheus_client.CollectorRegistry` (not the process-global one, so a test can build
several). :class:`MetricsServer` (in :mod:`essd.metrics_http`, re-exported here) serves that
registry over HTTP on the daemon's event loop, bound to 127.0.0.1 unless configured otherwise
(``metrics.bind`` / ``metrics.port``), from :attr:`MetricsExporter.exposition_cache`: the
registry is rendered at most once per cycle, however often it is scraped.

Names follow the Prometheus conventions: prefix ``essd_``, base units (``_watts``,
``_joules_total`` for energy, ``_ratio``, ``_seconds``, ``_grams``), counters end in ``_total``.
Sign conventions as everywhere in essd: battery W > 0 discharges into the site, < 0 charges;
grid W > 0 imports, < 0 exports. Prices are per kWh in the tariff currency (``essd_site_info``
names it), because no base unit for money exists and operators read tariffs per kWh.

Label values come from fixed sets or from the configuration (device ids): free text, such as
a plan's reason, is mapped to a small set of categories (:func:`reason_category`) and names
that arrive from outside (error kinds, command names) are capped (:class:`BoundedLabel`), so a
misbehaving peer cannot blow up the number of series.

Current values (power, SoC, limits, ages, cumulative counters) are rendered from the last
:class:`~essd.events.CycleCompleted` by a custom collector: ages are measured against the
daemon's clock when the payload is rendered (after each cycle, and again once it is a second
old), so a stalled loop shows as a growing age.
Distributions (cycle, phase, solve and Modbus latency) are histograms updated per event.
"""

from __future__ import annotations

import math
import platform
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from essd import __version__
from essd.clock import Clock
from essd.domain import DeviceState, FallbackRung, Plan, PlanCause, Quality, Setpoint
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
from essd.metrics_http import ExpositionCache, MetricsServer, MetricsServerError

if TYPE_CHECKING:
    from essd.config import Settings

__all__ = [
    "COMMANDS",
    "CONTROL_MODES",
    "CYCLE_PHASES",
    "REASON_CATEGORIES",
    "SOLVER_FAILURE_CAUSES",
    "SOLVER_STATUSES",
    "BoundedLabel",
    "ExpositionCache",
    "MetricsExporter",
    "MetricsServer",
    "MetricsServerError",
    "reason_category",
    "solver_failure_cause",
]

JOULES_PER_WH = 3600.0
GRAMS_PER_KG = 1000.0

#: Phases of a cycle (DESIGN.md); any other phase name is counted as "other".
CYCLE_PHASES = ("read", "snapshot", "forecast", "decide", "guard", "write", "publish")
#: cvxpy's status strings plus the two the fallback planners use; anything else is "other".
SOLVER_STATUSES = (
    "optimal",
    "optimal_inaccurate",
    "infeasible",
    "infeasible_inaccurate",
    "unbounded",
    "unbounded_inaccurate",
    "infeasible_or_unbounded",
    "user_limit",
    "solver_error",
    "rule_based",
    "idle",
    "other",
)
#: Why the plan in force was made: the values of the typed cause (essd.domain.PlanCause).
REASON_CATEGORIES = tuple(c.value for c in PlanCause)
#: Solver failures by cause (a fallback plan made because the optimizer did not deliver).
SOLVER_FAILURE_CAUSES = ("timeout", "status", "error")
CONTROL_MODES = ("auto", "manual", "standby")
#: Operator commands of the MQTT contract (DESIGN.md); their counters exist from the start.
COMMANDS = ("mode", "reserve", "setpoint", "prices", "forecast")

# Cycle periods are 1..300 s; a cycle normally takes tens of milliseconds to a few seconds.
_CYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# The solve budget is at most 60 s (ControlConfig.solve_budget_s), 2 s by default.
_SOLVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Modbus TCP answers in milliseconds; RTU at 9600 baud and timeouts (<= 10 s) take longer.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

_LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Kinds of failed requests the drivers count (drivers.modbus.ErrorKind) plus the daemon's
# whole-read deadline; other kinds are still exported, up to a bounded number of labels.
ERROR_KINDS = (
    "timeout",
    "connection",
    "backoff",
    "exception",
    "protocol",
    "readback_mismatch",
    "read_deadline",
)


class BoundedLabel:
    """Label values from a fixed set, plus at most ``extra`` new ones; the rest become "other".

    New values must look like identifiers (lower case, digits, ``_``, up to 32 characters),
    so nothing that arrives from the network can create series without bound.
    """

    def __init__(self, known: Iterable[str], *, extra: int) -> None:
        self._allowed = set(known)
        self._extra = extra
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """The label value to use for ``value``."""
        if value in self._allowed:
            return value
        with self._lock:
            if value in self._allowed:
                return value
            if self._extra > 0 and _LABEL_VALUE.match(value):
                self._extra -= 1
                self._allowed.add(value)
                return value
        return "other"


def reason_category(plan: Plan, mode: str = "auto") -> str:
    """The ``reason`` label of a plan: its typed cause (manual and standby by mode)."""
    if mode in ("manual", "standby"):
        return mode
    return plan.cause.value


_SOLVER_FAILURES = {
    PlanCause.SOLVER_TIMEOUT: "timeout",
    PlanCause.SOLVE_LATE: "timeout",
    PlanCause.SOLVE_BUSY: "timeout",
    PlanCause.SOLVER_STATUS: "status",
    PlanCause.SOLVER_ERROR: "error",
}


def solver_failure_cause(plan: Plan) -> str | None:
    """``timeout``, ``status`` or ``error`` when a fallback plan is in force because the solve
    failed that way; None when the optimizer's plan is in force or it failed for another reason.
    """
    return _SOLVER_FAILURES.get(plan.cause)


@dataclass(frozen=True, slots=True)
class _State:
    """What the scrape-time collector renders; replaced whole, never mutated (thread safety)."""

    cycle: CycleCompleted | None = None
    setpoints: Mapping[str, Setpoint] = field(default_factory=dict)
    device_states: Mapping[str, DeviceState] = field(default_factory=dict)
    mqtt_connected: bool | None = None
    daemon_status: DaemonStatus | None = None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


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
        self._state = _State(mqtt_connected=False if mqtt_enabled else None)
        self._lock = threading.Lock()  # serializes writers; readers take the reference only
        self._phase = BoundedLabel(CYCLE_PHASES, extra=0)
        self._error_kind = BoundedLabel(ERROR_KINDS, extra=12)
        commands = tuple(commands)
        self._command = BoundedLabel(commands, extra=24)
        self._solver_status = BoundedLabel(SOLVER_STATUSES, extra=0)
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
            buckets=_PHASE_BUCKETS,
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
            buckets=_LATENCY_BUCKETS,
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
        r.register(_LiveCollector(self))
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
    def state(self) -> _State:
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
            if _finite(seconds):
                self.phase_duration.labels(self._phase(phase)).observe(max(0.0, seconds))
        plan = ev.plan
        if plan.rung <= FallbackRung.SOFT and _finite(plan.solve_s) and plan.solve_s > 0:
            self.solve_duration.observe(plan.solve_s)
        self.rung_cycles.labels(str(int(plan.rung))).inc()
        cause = solver_failure_cause(plan)
        if cause is not None:
            self.solver_failures.labels(cause).inc()
        for dev, counters in ev.device_counters.items():
            if _finite(counters.last_latency_s):
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


class _Families:
    """Builds gauge and counter families, skipping values that are unknown or not finite."""

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float | None) -> None:
        if not _finite(value):
            return
        assert value is not None
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        fam.add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        if not _finite(value):
            return
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = CounterMetricFamily(name, doc, labels=list(labels))
        fam.add_metric(list(labels.values()), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class _LiveCollector(Collector):
    """Renders the exporter's latest state whenever the registry is rendered."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._x = exporter

    def collect(self) -> Iterable[Metric]:
        """Families for the current state; empty before the first event."""
        x = self._x
        st = x.state  # one reference read: the state is immutable
        now = x.clock.monotonic()
        f = _Families()
        if st.mqtt_connected is not None:
            f.gauge(
                "essd_mqtt_connected",
                "1 while connected to the MQTT broker, else 0.",
                {},
                1.0 if st.mqtt_connected else 0.0,
            )
        if st.daemon_status is not None:
            _enum(
                f,
                "essd_daemon_status",
                doc="The daemon's lifecycle state (1 for the current one).",
                labels={},
                key="status",
                states=[s.value for s in DaemonStatus],
                current=st.daemon_status.value,
            )
        ev = st.cycle
        if ev is not None:
            _cycle_families(f, x, st, ev, now)
        return list(f)


def _enum(
    f: _Families,
    name: str,
    *,
    doc: str,
    labels: Mapping[str, str],
    key: str,
    states: Iterable[str],
    current: str,
) -> None:
    for s in states:
        f.gauge(name, doc, {**labels, key: s}, 1.0 if s == current else 0.0)


def _cycle_families(
    f: _Families, x: MetricsExporter, st: _State, ev: CycleCompleted, now: float
) -> None:
    _control_families(f, x, ev, now)
    _site_families(f, ev)
    _device_families(f, x, st, ev, now)


def _control_families(f: _Families, x: MetricsExporter, ev: CycleCompleted, now: float) -> None:
    plan = ev.plan
    # Cycle and control state.
    f.gauge("essd_cycle_period_seconds", "Configured period of the control cycle.", {}, ev.period_s)
    f.gauge(
        "essd_cycle_age_seconds",
        "Seconds since the last completed control cycle started (on the daemon's clock).",
        {},
        max(0.0, now - ev.snapshot.mono),
    )
    f.counter(
        "essd_cycle_overruns_total",
        "Control cycles that took longer than the period (counted, never stacked).",
        {},
        float(ev.overruns_total),
    )
    _enum(
        f,
        "essd_control_mode",
        doc="Control mode (1 for the current one).",
        labels={},
        key="mode",
        states=CONTROL_MODES,
        current=ev.mode,
    )
    f.gauge("essd_reserve_soc_ratio", "Site-wide SoC reserve in force, 0..1.", {}, ev.reserve_soc)
    # The plan and the solver.
    f.gauge(
        "essd_plan_rung",
        "Fallback rung of the plan in force: 1 optimal, 2 soft constraints, 3 last plan, "
        "4 rule-based, 5 safe idle.",
        {},
        float(int(plan.rung)),
    )
    _enum(
        f,
        "essd_plan_reason",
        doc="Why the plan in force was made, as a category (1 for the current one).",
        labels={},
        key="reason",
        states=REASON_CATEGORIES,
        current=reason_category(plan, ev.mode),
    )
    _enum(
        f,
        "essd_solver_status",
        doc="Solver status of the plan in force (1 for the current one).",
        labels={},
        key="status",
        states=SOLVER_STATUSES,
        current=x._solver_status(plan.solver_status.lower()),
    )
    f.gauge(
        "essd_plan_objective",
        "Objective value of the plan in force, in the tariff currency over the horizon.",
        {},
        plan.objective,
    )
    f.gauge(
        "essd_solver_failures_consecutive",
        "Dispatch solves in a row that failed (not budget overruns); 0 when the solver works.",
        {},
        float(ev.solver_failures_consecutive),
    )
    f.counter(
        "essd_solver_rebuilds_total",
        "Times the solver was rebuilt cold after a streak of failed solves.",
        {},
        float(ev.solver_rebuilds_total),
    )
    if ev.credibility is not None:
        f.gauge(
            "essd_meter_plausible",
            "1 when the grid meter's reading is believed; 0 idles every battery this cycle.",
            {},
            float(ev.credibility.meter.plausible),
        )
        f.gauge(
            "essd_site_limit_margin_watts",
            "Margin the guard keeps inside the import and export limits (meter error, steps).",
            {},
            ev.credibility.limit_margin_w,
        )
    f.gauge(
        "essd_site_limit_unmet_watts",
        "How far a site limit stays exceeded after the guard (no unit had headroom left).",
        {},
        ev.site_limit_unmet_w,
    )
    f.gauge(
        "essd_guard_predicted_grid_watts",
        "Grid power the guard predicts after this cycle's setpoints (> 0 imports).",
        {},
        ev.predicted_grid_w,
    )
    for phase in CYCLE_PHASES:
        f.gauge(
            "essd_cycle_phase_failed",
            "1 when the phase failed in the last cycle (the cycle went on on a lower rung).",
            {"phase": phase},
            float(phase in ev.phase_errors),
        )
    if plan.grid_w:
        f.gauge(
            "essd_plan_grid_power_watts",
            "Grid power the plan predicts for the current step (> 0 imports).",
            {},
            plan.grid_w[0],
        )


def _site_families(f: _Families, ev: CycleCompleted) -> None:
    f.gauge(
        "essd_grid_power_watts",
        "Measured grid power at the point of connection (> 0 imports, < 0 exports).",
        {},
        ev.grid_power_w,
    )
    f.gauge(
        "essd_grid_import_limit_watts",
        "Import limit in force at the connection (magnitude).",
        {},
        ev.import_limit_w,
    )
    f.gauge(
        "essd_grid_export_limit_watts",
        "Export limit in force at the connection (magnitude; 0 = zero export).",
        {},
        ev.export_limit_w,
    )
    f.gauge(
        "essd_tariff_import_price_per_kwh",
        "Import price in force, tariff currency per kWh.",
        {},
        ev.import_price,
    )
    f.gauge(
        "essd_tariff_export_price_per_kwh",
        "Export price in force, tariff currency per kWh.",
        {},
        ev.export_price,
    )
    f.gauge(
        "essd_grid_carbon_intensity_grams_per_kwh",
        "Carbon intensity of grid electricity in force, g CO2 per kWh.",
        {},
        ev.carbon_intensity_g_per_kwh,
    )
    t = ev.totals
    f.counter(
        "essd_site_imported_energy_joules_total",
        "Energy imported from the grid since start.",
        {},
        t.imported_wh * JOULES_PER_WH,
    )
    f.counter(
        "essd_site_exported_energy_joules_total",
        "Energy exported to the grid since start.",
        {},
        t.exported_wh * JOULES_PER_WH,
    )
    f.gauge(
        "essd_site_cost",
        "Net cost since start in the tariff currency: energy (import - export) and carbon price.",
        {},
        t.cost,
    )
    f.gauge("essd_site_co2_grams", "CO2 attributed to the site since start.", {}, t.co2_kg * 1e3)


def _device_families(
    f: _Families, x: MetricsExporter, st: _State, ev: CycleCompleted, now: float
) -> None:
    plan = ev.plan
    snap = ev.snapshot
    states = st.device_states
    for dev, b in snap.batteries.items():
        d = {"device": dev}
        f.gauge(
            "essd_device_info",
            "A configured device and its class (always 1).",
            {**d, "device_class": b.device_class.value},
            1.0,
        )
        f.gauge(
            "essd_device_up",
            "1 when the device answered this cycle, else 0.",
            d,
            float(b.available),
        )
        if b.soc.value is not None and b.soc.quality is not Quality.INVALID:
            f.gauge("essd_device_soc_ratio", "State of charge, 0..1.", d, b.soc.value)
        if b.power_w.value is not None and b.power_w.quality is not Quality.INVALID:
            f.gauge(
                "essd_device_power_watts",
                "Measured battery power (> 0 discharges into the site, < 0 charges).",
                d,
                b.power_w.value,
            )
        if b.limits is not None:
            f.gauge(
                "essd_device_max_charge_watts",
                "Live charge limit (magnitude) from the BMS, profile and configuration.",
                d,
                b.limits.max_charge_w,
            )
            f.gauge(
                "essd_device_max_discharge_watts",
                "Live discharge limit (magnitude) from the BMS, profile and configuration.",
                d,
                b.limits.max_discharge_w,
            )
        f.gauge(
            "essd_device_capacity_joules",
            "Usable energy capacity of the device.",
            d,
            b.capacity_wh * JOULES_PER_WH,
        )
        record = ev.devices.get(dev)
        reserve, max_soc = _soc_window(ev, dev)
        f.gauge("essd_device_soc_reserve_ratio", "Lowest SoC allowed (reserve), 0..1.", d, reserve)
        f.gauge("essd_device_soc_max_ratio", "Highest SoC allowed, 0..1.", d, max_soc)
        if record is not None:
            f.gauge(
                "essd_device_credible",
                "1 when the device's readings are believed, 0 while the credibility screen holds "
                "it at 0 W (frozen, power or SoC not matching what it was told).",
                d,
                float(record.credible),
            )
            f.gauge(
                "essd_device_write_failures",
                "Cycles in a row whose write to the device failed (0 when the last succeeded).",
                d,
                float(record.write.consecutive_failures),
            )
        planned = plan.power_w.get(dev)
        if planned:
            f.gauge(
                "essd_device_plan_power_watts",
                "Power the plan asks for in the current step, before the safety guard "
                "(> 0 discharges).",
                d,
                planned[0],
            )
    meter = snap.meter
    if meter is not None:
        f.gauge(
            "essd_device_up",
            "1 when the device answered this cycle, else 0.",
            {"device": meter.device_id},
            float(meter.grid_power_w.quality is not Quality.MISSING),
        )
        f.gauge(
            "essd_device_info",
            "A configured device and its class (always 1).",
            {"device": meter.device_id, "device_class": "meter"},
            1.0,
        )
    for dev, state in states.items():
        _enum(
            f,
            "essd_device_state",
            doc="Device lifecycle state (1 for the current one).",
            labels={"device": dev},
            key="state",
            states=[s.value for s in DeviceState],
            current=state.value,
        )
    _setpoint_families(f, st, ev, now)
    for dev, c in ev.device_counters.items():
        d = {"device": dev}
        f.counter(
            "essd_device_modbus_requests_total",
            "Modbus requests sent to the device.",
            d,
            c.requests_total,
        )
        # Every known kind is exported from the start (at 0), so rates and alerts see a series.
        errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        for kind, n in c.errors_total.items():
            label = x._error_kind(kind)
            errors[label] = errors.get(label, 0) + n
        for label, n in sorted(errors.items()):
            f.counter(
                "essd_device_modbus_errors_total",
                "Failed Modbus requests, by kind (timeout, exception, connection, decode...).",
                {**d, "kind": label},
                n,
            )
        f.counter(
            "essd_device_modbus_writes_total", "Modbus writes to the device.", d, c.writes_total
        )
        f.counter(
            "essd_device_readback_mismatches_total",
            "Writes whose read-back differed from the value written.",
            d,
            c.readback_mismatches_total,
        )


def _soc_window(ev: CycleCompleted, dev: str) -> tuple[float | None, float | None]:
    """The SoC window the guard enforced this cycle (operator reserve included)."""
    record = ev.devices.get(dev)
    if record is not None and record.limits is not None:
        return record.limits.reserve_soc, record.limits.max_soc
    return None, None


def _setpoint_families(f: _Families, st: _State, ev: CycleCompleted, now: float) -> None:
    """Each unit's last accepted setpoint and its age, from the cycle's record."""
    since_cycle = max(0.0, now - ev.snapshot.mono)
    for dev, sp in st.setpoints.items():
        d = {"device": dev}
        record = ev.devices.get(dev)
        if record is None:
            # No record of this device's writes (older producers): the guard's setpoint.
            written: float | None = sp.power_w
            age: float | None = max(0.0, now - sp.issued_at_mono)
        else:
            written = record.write.power_w if record.write.power_w is not None else 0.0
            age = None if record.setpoint_age_s is None else record.setpoint_age_s + since_cycle
        f.gauge(
            "essd_device_setpoint_watts",
            "Last power setpoint the device accepted (> 0 discharges, < 0 charges, 0 idle).",
            d,
            written,
        )
        f.gauge("essd_device_setpoint_ttl_seconds", "Time-to-live of that setpoint.", d, sp.ttl_s)
        f.gauge(
            "essd_device_setpoint_age_seconds",
            "Seconds since the device last accepted a write (on the daemon's clock).",
            d,
            age,
        )
