"""The metrics rendered at scrape time from the exporter's latest state.

Current values (power, SoC, limits, ages, cumulative counters) are rendered from the last
:class:`~essd.events.CycleCompleted` by a custom collector: ages are measured against the
daemon's clock when the payload is rendered (after each cycle, and again once it is a second
old), so a stalled loop shows as a growing age.
Distributions (cycle, phase, solve and Modbus latency) are histograms updated per event.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from essd.clock import Clock
from essd.domain import DeviceState, Quality, Setpoint
from essd.events import CycleCompleted, DaemonStatus, OnlineForecastStatus
from essd.metrics.labels import (
    CONTROL_MODES,
    CYCLE_PHASES,
    ERROR_KINDS,
    JOULES_PER_WH,
    REASON_CATEGORIES,
    SOLVER_STATUSES,
    BoundedLabel,
    reason_category,
)


@dataclass(frozen=True, slots=True)
class ExporterState:
    """What the scrape-time collector renders; replaced whole, never mutated (thread safety)."""

    cycle: CycleCompleted | None = None
    setpoints: Mapping[str, Setpoint] = field(default_factory=dict)
    device_states: Mapping[str, DeviceState] = field(default_factory=dict)
    mqtt_connected: bool | None = None
    daemon_status: DaemonStatus | None = None
    online: Mapping[str, OnlineForecastStatus] = field(default_factory=dict)


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class LiveSource(Protocol):
    """What the collector reads from the exporter (:class:`essd.metrics.MetricsExporter`)."""

    @property
    def state(self) -> ExporterState:
        """The latest state, replaced whole on every event."""
        ...

    @property
    def clock(self) -> Clock:
        """The daemon's clock: ages are measured on it."""
        ...

    @property
    def solver_status(self) -> BoundedLabel:
        """Caps the solver status label."""
        ...

    @property
    def error_kind(self) -> BoundedLabel:
        """Caps the communication error kind label."""
        ...


class _Families:
    """Builds gauge and counter families, skipping values that are unknown or not finite."""

    def __init__(self) -> None:
        self._families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: float | None) -> None:
        if not finite(value):
            return
        assert value is not None
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        fam.add_metric(list(labels.values()), value)

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        if not finite(value):
            return
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = CounterMetricFamily(name, doc, labels=list(labels))
        fam.add_metric(list(labels.values()), value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class LiveCollector(Collector):
    """Renders the exporter's latest state whenever the registry is rendered."""

    def __init__(self, exporter: LiveSource) -> None:
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
        wall = x.clock.now()
        for source, o in st.online.items():  # None (never) renders nothing
            age = None if o.last_success is None else wall - o.last_success
            ahead = None if o.covers_until is None else o.covers_until - wall
            for name, doc, value in (
                ("failures", "Failed fetches of a source since its last good one.", o.failures),
                ("age_seconds", "Seconds since a source's last good fetch.", age),
                ("ahead_seconds", "How far ahead of now a source's series reaches.", ahead),
            ):
                f.gauge(f"essd_online_forecast_{name}", doc, {"source": source}, value)
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
    f: _Families, x: LiveSource, st: ExporterState, ev: CycleCompleted, now: float
) -> None:
    _control_families(f, x, ev, now)
    _site_families(f, ev)
    _device_families(f, x, st, ev, now)


def _control_families(f: _Families, x: LiveSource, ev: CycleCompleted, now: float) -> None:
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
        current=x.solver_status(plan.solver_status.lower()),
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
    f: _Families, x: LiveSource, st: ExporterState, ev: CycleCompleted, now: float
) -> None:
    plan = ev.plan
    snap = ev.snapshot
    states = st.device_states
    seen = [(dev, b.device_class.value, b.available) for dev, b in snap.batteries.items()]
    if snap.meter is not None:
        m = snap.meter
        seen.append((m.device_id, "meter", m.grid_power_w.quality is not Quality.MISSING))
    for dev, device_class, up in seen:
        d = {"device": dev}
        f.gauge(
            "essd_device_info",
            "A configured device and its class (always 1).",
            {**d, "device_class": device_class},
            1.0,
        )
        f.gauge("essd_device_up", "1 when the device answered this cycle, else 0.", d, float(up))
    for dev, b in snap.batteries.items():
        d = {"device": dev}
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
            label = x.error_kind(kind)
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


def _setpoint_families(f: _Families, st: ExporterState, ev: CycleCompleted, now: float) -> None:
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
