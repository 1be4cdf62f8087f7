"""The metrics exporter: events in, Prometheus exposition out; its HTTP endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from essd.clock import SimClock
from essd.config import MetricsConfig
from essd.config_loading import load_settings
from essd.counters import DeviceCounters
from essd.domain import FallbackRung, Plan, PlanCause
from essd.events import (
    CommandHandled,
    CycleCompleted,
    DaemonStatus,
    DaemonStatusChanged,
    EventBus,
    MqttConnectionChanged,
    WriteStatus,
)
from essd.metrics import (
    REASON_CATEGORIES,
    BoundedLabel,
    MetricsExporter,
    MetricsServer,
    MetricsServerError,
    reason_category,
    solver_failure_cause,
)
from tests.support.prometheus import FakeSite, http_get, program

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exporter: MetricsExporter) -> Samples:
    """Every sample of a scrape, keyed by name and label set."""
    out: Samples = {}
    for fam in text_string_to_metric_families(exporter.exposition().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError naming it when absent."""
    key = (name, frozenset(labels.items()))
    if key not in s:
        raise KeyError(f"{name}{labels} not exposed")
    return s[key]


@pytest.fixture
def clock() -> SimClock:
    return SimClock(1_767_225_600.0)


@pytest.fixture
def exporter(clock: SimClock) -> MetricsExporter:
    return MetricsExporter(clock=clock, site_id="demo", currency="CNY")


@pytest.fixture
def site(clock: SimClock) -> FakeSite:
    return FakeSite(clock, period_s=10.0, ttl_s=60.0)


def feed(exporter: MetricsExporter, site: FakeSite, clock: SimClock, cycles: int) -> CycleCompleted:
    """Publish the start-up events and ``cycles`` cycles 10 s apart; returns the last cycle."""
    bus = EventBus()
    exporter.attach(bus)
    for ev in site.startup_events():
        bus.publish(ev)
    last = None
    for _ in range(cycles):
        last = site.next_event()
        bus.publish(last)
        clock.advance(10.0)
    assert last is not None
    return last


def test_cycle_values_in_base_units(
    exporter: MetricsExporter, site: FakeSite, clock: SimClock
) -> None:
    ev = feed(exporter, site, clock, 3)
    s = samples(exporter)
    assert value(s, "essd_grid_power_watts") == pytest.approx(ev.grid_power_w)
    assert value(s, "essd_site_imported_energy_joules_total") == pytest.approx(
        ev.totals.imported_wh * 3600.0
    )
    assert value(s, "essd_site_co2_grams") == pytest.approx(ev.totals.co2_kg * 1000.0)
    assert value(s, "essd_site_cost") == pytest.approx(ev.totals.cost)
    assert value(s, "essd_grid_import_limit_watts") == 250_000.0
    assert value(s, "essd_tariff_import_price_per_kwh") == ev.import_price
    assert value(s, "essd_grid_carbon_intensity_grams_per_kwh") == 581.0
    pcs1 = ev.snapshot.batteries["pcs1"]
    assert value(s, "essd_device_soc_ratio", device="pcs1") == pytest.approx(pcs1.soc.value)
    assert value(s, "essd_device_power_watts", device="pcs1") == pytest.approx(pcs1.power_w.value)
    assert value(s, "essd_device_setpoint_watts", device="pcs1") == ev.setpoints["pcs1"].power_w
    assert value(s, "essd_device_max_charge_watts", device="hybrid1") == 5000.0
    assert value(s, "essd_device_capacity_joules", device="portable1") == 2000.0 * 3600.0
    assert value(s, "essd_device_soc_reserve_ratio", device="pcs1") == 0.10
    assert value(s, "essd_device_soc_max_ratio", device="pcs1") == 0.95
    assert value(s, "essd_device_up", device="meter") == 1.0
    assert value(s, "essd_device_info", device="hybrid1", device_class="household") == 1.0
    assert value(s, "essd_device_state", device="pcs2", state="running") == 1.0
    assert value(s, "essd_device_state", device="pcs2", state="fault") == 0.0
    assert value(s, "essd_device_modbus_requests_total", device="pcs1") == 18.0
    assert value(s, "essd_device_modbus_writes_total", device="pcs1") == 6.0
    assert value(s, "essd_device_modbus_errors_total", device="portable1", kind="timeout") == 0.0
    assert value(s, "essd_cycle_duration_seconds_count") == 3.0
    assert value(s, "essd_cycle_phase_duration_seconds_count", phase="decide") == 3.0
    assert value(s, "essd_solve_duration_seconds_count") == 3.0
    assert value(s, "essd_device_modbus_latency_seconds_count", device="pcs1") == 3.0
    assert value(s, "essd_plan_rung") == 1.0
    assert value(s, "essd_plan_rung_cycles_total", rung="1") == 3.0
    assert value(s, "essd_plan_rung_cycles_total", rung="5") == 0.0
    assert value(s, "essd_plan_reason", reason="optimal") == 1.0
    assert value(s, "essd_solver_status", status="optimal") == 1.0
    assert value(s, "essd_control_mode", mode="auto") == 1.0
    assert value(s, "essd_cycle_period_seconds") == 10.0
    assert value(s, "essd_build_info", version="0.1.0", python=value_label(s, "essd_build_info"))
    assert value(s, "essd_site_info", site="demo", currency="CNY") == 1.0
    assert value(s, "essd_mqtt_connected") == 1.0
    assert value(s, "essd_daemon_status", status="online") == 1.0
    assert value(s, "essd_commands_total", command="reserve", result="ok") == 1.0
    assert value(s, "essd_commands_total", command="setpoint", result="refused") == 1.0
    assert value(s, "essd_device_state_changes_total", device="meter", state="running") == 1.0
    assert value(s, "process_cpu_seconds_total") > 0.0


def value_label(s: Samples, name: str) -> str:
    """The python label of the build info (whatever interpreter runs the tests)."""
    (labels,) = [dict(k[1]) for k in s if k[0] == name]
    return labels["python"]


def test_exactly_one_state_is_current_in_every_enum(
    exporter: MetricsExporter, site: FakeSite, clock: SimClock
) -> None:
    feed(exporter, site, clock, 2)
    s = samples(exporter)
    for name, key in [
        ("essd_plan_reason", "reason"),
        ("essd_solver_status", "status"),
        ("essd_control_mode", "mode"),
        ("essd_daemon_status", "status"),
    ]:
        current = [dict(k[1])[key] for k, v in s.items() if k[0] == name and v == 1.0]
        assert len(current) == 1, (name, current)
    per_device: dict[str, float] = {}
    for (name, labels), v in s.items():
        if name == "essd_device_state":
            dev = dict(labels)["device"]
            per_device[dev] = per_device.get(dev, 0.0) + v
    assert per_device == dict.fromkeys(["pcs1", "pcs2", "hybrid1", "portable1", "meter"], 1.0)


def test_setpoint_and_cycle_ages_grow_on_the_daemon_clock(
    exporter: MetricsExporter, site: FakeSite, clock: SimClock
) -> None:
    feed(exporter, site, clock, 1)  # the cycle ran at mono 0, the clock is now at 10 s
    s = samples(exporter)
    assert value(s, "essd_device_setpoint_age_seconds", device="pcs1") == pytest.approx(10.0)
    assert value(s, "essd_device_setpoint_ttl_seconds", device="pcs1") == 60.0
    assert value(s, "essd_cycle_age_seconds") == pytest.approx(10.0)
    clock.advance(65.0)  # nothing published: a stalled loop
    s = samples(exporter)
    assert value(s, "essd_device_setpoint_age_seconds", device="pcs1") == pytest.approx(75.0)
    assert value(s, "essd_cycle_age_seconds") == pytest.approx(75.0)


def test_setpoint_age_counts_from_the_last_accepted_write(
    exporter: MetricsExporter, site: FakeSite, clock: SimClock
) -> None:
    bus = EventBus()
    exporter.attach(bus)
    ev = site.next_event()
    rec = ev.devices["pcs1"]
    refused = dataclasses.replace(
        rec,
        setpoint_age_s=250.0,
        write=dataclasses.replace(rec.write, status=WriteStatus.FAILED, consecutive_failures=25),
    )
    bus.publish(dataclasses.replace(ev, devices={**ev.devices, "pcs1": refused}))
    clock.advance(30.0)
    s = samples(exporter)
    # The guard issued a setpoint 30 s ago, but the device last took one 280 s ago.
    assert value(s, "essd_device_setpoint_age_seconds", device="pcs1") == pytest.approx(280.0)
    assert value(s, "essd_device_write_failures", device="pcs1") == 25.0
    assert value(s, "essd_device_write_failures", device="pcs2") == 0.0


def test_fallback_plan_counts_a_solver_failure_by_cause(
    exporter: MetricsExporter, site: FakeSite, clock: SimClock
) -> None:
    bus = EventBus()
    exporter.attach(bus)
    ev = site.next_event()
    bus.publish(ev)
    shifted = ev.plan.shifted_to(
        ev.time + 10.0,
        rung=FallbackRung.LAST_PLAN,
        reason="solver timeout after 2.01 s",
        cause=PlanCause.SOLVER_TIMEOUT,
    )
    assert shifted is not None
    bus.publish(dataclasses.replace(site.next_event(), plan=shifted))
    s = samples(exporter)
    assert value(s, "essd_plan_rung") == 3.0
    assert value(s, "essd_solver_failures_total", cause="timeout") == 1.0
    assert value(s, "essd_solver_failures_total", cause="error") == 0.0
    assert value(s, "essd_plan_rung_cycles_total", rung="3") == 1.0
    assert value(s, "essd_plan_reason", reason="solver_timeout") == 1.0
    # Only fresh solves are timed: the shifted plan's solve_s is 0.
    assert value(s, "essd_solve_duration_seconds_count") == 1.0


def test_unknown_and_non_finite_values_are_left_out(
    exporter: MetricsExporter, site: FakeSite
) -> None:
    ev = site.next_event()
    idle = dataclasses.replace(
        ev.plan, objective=math.nan, rung=FallbackRung.SAFE_IDLE, solver_status="idle"
    )
    exporter.handle(dataclasses.replace(ev, plan=idle, grid_power_w=None))
    s = samples(exporter)
    names = {k[0] for k in s}
    assert "essd_plan_objective" not in names
    assert "essd_grid_power_watts" not in names
    assert value(s, "essd_solver_status", status="idle") == 1.0
    assert value(s, "essd_plan_rung") == 5.0


def test_nothing_current_is_exposed_before_the_first_event(clock: SimClock) -> None:
    exporter = MetricsExporter(clock=clock, process_metrics=False)
    names = {k[0] for k in samples(exporter)}
    assert "essd_build_info" in names
    assert not any(n.startswith(("essd_device_", "essd_grid_", "essd_mqtt")) for n in names)
    assert not any(n.startswith("process_") for n in names)


@pytest.mark.parametrize(
    ("cause", "mode", "category", "failure"),
    [
        (PlanCause.OPTIMAL, "auto", "optimal", None),
        (PlanCause.SOFT_CONSTRAINTS, "auto", "soft_constraints", None),
        (PlanCause.SOLVER_TIMEOUT, "auto", "solver_timeout", "timeout"),
        (PlanCause.SOLVE_LATE, "auto", "solve_late", "timeout"),
        (PlanCause.SOLVER_STATUS, "auto", "solver_status", "status"),
        (PlanCause.SOLVER_ERROR, "auto", "solver_error", "error"),
        (PlanCause.INVALID_INPUTS, "auto", "invalid_inputs", None),
        (PlanCause.FORECAST_INVALID, "auto", "forecast_invalid", None),
        (PlanCause.STALE_DATA, "auto", "stale_data", None),
        (PlanCause.MANUAL, "manual", "manual", None),
        (PlanCause.STANDBY, "standby", "standby", None),
    ],
)
def test_reason_label_is_the_typed_cause(
    site: FakeSite, cause: PlanCause, mode: str, category: str, failure: str | None
) -> None:
    # The free text is for people: the label comes from the cause, whatever the text says.
    plan: Plan = dataclasses.replace(
        site.next_event().plan, rung=FallbackRung.RULE_BASED, reason="optimal", cause=cause
    )
    assert reason_category(plan, mode) == category
    assert category in REASON_CATEGORIES
    assert solver_failure_cause(plan) == failure


def test_label_values_from_outside_are_capped() -> None:
    label = BoundedLabel(("timeout",), extra=2)
    assert label("timeout") == "timeout"
    assert label("Bad Value; drop table") == "other"
    assert label("x" * 40) == "other"
    assert label("crc") == "crc"
    assert label("framing") == "framing"
    assert label("one_too_many") == "other"
    assert label("crc") == "crc"


def test_command_names_cannot_grow_series_without_bound(
    exporter: MetricsExporter,
) -> None:
    for i in range(100):
        exporter.handle(CommandHandled(f"cmd{i}", ok=False, error="unknown", time=0.0))
    commands = {dict(k[1])["command"] for k in samples(exporter) if k[0] == "essd_commands_total"}
    assert len(commands) == 5 + 24 + 1  # the contract's commands, 24 new names, "other"
    assert "other" in commands
    assert {"mode", "reserve", "setpoint", "prices", "forecast"} <= commands


def test_command_counters_exist_before_the_first_command(exporter: MetricsExporter) -> None:
    s = samples(exporter)
    assert value(s, "essd_commands_total", command="mode", result="ok") == 0.0
    assert value(s, "essd_commands_total", command="forecast", result="refused") == 0.0


def test_error_kinds_beyond_the_cap_are_summed_into_other(
    exporter: MetricsExporter, site: FakeSite
) -> None:
    ev = site.next_event()
    kinds = {f"kind{i}": 1 for i in range(20)} | {"timeout": 3}
    counters = {"pcs1": DeviceCounters(requests_total=30, errors_total=kinds)}
    exporter.handle(dataclasses.replace(ev, device_counters=counters))
    s = samples(exporter)
    errors = {
        dict(k[1])["kind"]: v for k, v in s.items() if k[0] == "essd_device_modbus_errors_total"
    }
    assert errors["timeout"] == 3.0
    assert errors["other"] == 8.0  # 12 new kinds admitted, the other 8 summed
    assert sum(errors.values()) == 23.0


def test_mqtt_state_and_daemon_status_follow_their_events(exporter: MetricsExporter) -> None:
    exporter.handle(MqttConnectionChanged(connected=False, time=0.0))
    exporter.handle(DaemonStatusChanged(DaemonStatus.STOPPING, 0.0))
    s = samples(exporter)
    assert value(s, "essd_mqtt_connected") == 0.0
    assert value(s, "essd_daemon_status", status="stopping") == 1.0
    exporter.set_mqtt_connected(True)
    assert value(samples(exporter), "essd_mqtt_connected") == 1.0


def test_configured_mqtt_reads_disconnected_until_told_otherwise(clock: SimClock) -> None:
    exporter = MetricsExporter(clock=clock, mqtt_enabled=True, process_metrics=False)
    assert value(samples(exporter), "essd_mqtt_connected") == 0.0
    exporter.handle(MqttConnectionChanged(connected=True, time=0.0))
    assert value(samples(exporter), "essd_mqtt_connected") == 1.0


def test_each_exporter_has_its_own_registry(clock: SimClock, site: FakeSite) -> None:
    a = MetricsExporter(clock=clock, process_metrics=False)
    b = MetricsExporter(clock=clock, process_metrics=False)
    a.handle(site.next_event())
    assert "essd_grid_power_watts" in {k[0] for k in samples(a)}
    assert "essd_grid_power_watts" not in {k[0] for k in samples(b)}


def test_from_settings_takes_site_currency_and_the_records_soc_windows(
    tmp_path: Path, clock: SimClock, site: FakeSite
) -> None:
    cfg = tmp_path / "essd.toml"
    cfg.write_text(
        """
[site]
id = "plant-7"
timezone = "Europe/Berlin"
grid_import_limit_w = 250000
grid_export_limit_w = 0
[mqtt]
host = "127.0.0.1"
[tariff]
currency = "EUR"
import_price_per_kwh = 0.3
[control]
max_soc = 0.9
[[devices]]
id = "pcs1"
profile = "x"
reserve_soc = 0.2
transport = { kind = "tcp", host = "127.0.0.1" }
[[devices]]
id = "pcs2"
profile = "x"
max_soc = 0.8
transport = { kind = "tcp", host = "127.0.0.1" }
"""
    )
    exporter = MetricsExporter.from_settings(load_settings(cfg), clock=clock)
    exporter.handle(site.next_event())
    s = samples(exporter)
    assert value(s, "essd_site_info", site="plant-7", currency="EUR") == 1.0
    assert value(s, "essd_mqtt_connected") == 0.0
    # The SoC window is the one the guard enforced, from the cycle's record, never the config.
    ev = site.next_event()
    exporter.handle(ev)
    s = samples(exporter)
    for dev, record in ev.devices.items():
        assert record.limits is not None
        assert value(s, "essd_device_soc_reserve_ratio", device=dev) == record.limits.reserve_soc
        assert value(s, "essd_device_soc_max_ratio", device=dev) == record.limits.max_soc


# ------------------------------------------------------------------------- the HTTP endpoint


@pytest.fixture
def server(exporter: MetricsExporter, site: FakeSite, clock: SimClock) -> Iterator[MetricsServer]:
    feed(exporter, site, clock, 5)
    srv = MetricsServer(exporter.registry, port=0)
    srv.start_sync()
    yield srv
    srv.stop_sync()


def test_promtool_check_metrics_is_clean_on_a_live_scrape(server: MetricsServer) -> None:
    body = http_get(server.url)
    assert b"essd_device_soc_ratio" in body
    result = subprocess.run(
        [program("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        check=False,
        timeout=30,
    )
    problems = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, problems
    assert problems.strip() == ""


def test_server_binds_loopback_by_default_and_releases_the_port(
    exporter: MetricsExporter,
) -> None:
    assert MetricsConfig().bind == "127.0.0.1"
    srv = MetricsServer.from_config(exporter.registry, MetricsConfig(port=9108))
    assert srv.url == "http://127.0.0.1:9108/metrics"
    srv = MetricsServer(exporter.registry, port=0)
    srv.start_sync()
    port = srv.port
    assert port != 0
    assert b"essd_build_info" in http_get(f"http://127.0.0.1:{port}/metrics")
    srv.stop_sync()
    assert srv.running is False
    again = MetricsServer(exporter.registry, port=port)  # a restart gets the same port
    again.start_sync()
    assert again.port == port
    again.stop_sync()


def test_a_taken_port_is_a_clear_error(exporter: MetricsExporter) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = MetricsServer(exporter.registry, port=port)
        with pytest.raises(MetricsServerError, match=r"metrics\.bind/metrics\.port: .*in use"):
            srv.start_sync()
        assert not srv.running


async def test_async_start_and_stop(exporter: MetricsExporter) -> None:
    async with MetricsServer(exporter.registry, port=0) as srv:
        assert srv.running
        # The server answers on this loop: a blocking client must run off it.
        body = await asyncio.to_thread(http_get, srv.url)
        assert b"essd_build_info" in body
    assert not srv.running
