"""Generate essd's Grafana dashboards with Grafana's foundation SDK.

    python observability/grafana/generate.py          # writes dashboards/*.json (make dashboards)
    python observability/grafana/generate.py --check  # exit 1 if a committed file differs

Three dashboards, all on the Prometheus data source ``essd-prometheus``:

- ``essd-site.json`` (site overview): power flows (grid, PV, net load, each battery), SoC,
  price and carbon, the plan ahead and the plan against what happened, today's and this month's
  energy, cost, savings and carbon, the billing peak against the import limit, alarms;
- ``essd.json`` (control-loop health): cycle and phase timing, overruns, fallback rungs, the
  solver, each device's setpoints, Modbus traffic and errors;
- ``essd-fleet.json`` (fleet): every site, one row each.

Every panel query selects ``instance=~"$instance"``; ``$instance`` follows the ``$site``
variable (from ``essd_site_info``), so several sites never mix. Money is in the site's tariff
currency, named in the panel titles (``$currency``). Not part of essd's runtime: a developer
and CI tool (``tests/test_dashboards.py`` checks the committed JSON equals this output).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).parent / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="essd-prometheus")
I = 'instance=~"$instance"'  # noqa: E741 - the selector every query carries
ID = I + ', device=~"$device"'

Panel = Any  # a panel builder of any kind


def sel(metric: str, extra: str = "") -> str:
    """``metric{instance=~"$instance"[, extra]}``."""
    return f"{metric}{{{I}{', ' + extra if extra else ''}}}"


def q(expr: str, legend: str = "", *, ref: str = "", instant: bool = False) -> Any:
    query = prometheus.Dataquery().expr(expr).datasource(DS)
    if legend:
        query = query.legend_format(legend)
    if ref:
        query = query.ref_id(ref)
    if instant:
        query = query.instant().format(PromQueryFormat.TABLE)
    return query


def _targets(panel: Panel, targets: Iterable[Any]) -> Panel:
    for n, t in enumerate(targets):
        panel = panel.with_target(t.ref_id(chr(ord("A") + n)))
    return panel.datasource(DS)


def ts(title: str, unit: str, targets: Iterable[Any], *, span: int = 12, h: int = 8) -> Panel:
    return _targets(timeseries.Panel().title(title).unit(unit).span(span).height(h), targets)


def st(
    title: str, unit: str, targets: Iterable[Any], *, span: int = 4, h: int = 4, when: str = ""
) -> Panel:
    panel = stat.Panel().title(title).unit(unit).span(span).height(h)
    if when:
        panel = panel.time_from(when)
    return _targets(panel, targets)


def bars(title: str, unit: str, targets: Iterable[Any], *, span: int = 12, h: int = 8) -> Panel:
    return _targets(bargauge.Panel().title(title).unit(unit).span(span).height(h), targets)


def variables(board: Any, *, devices: bool, all_sites: bool) -> Any:
    """``$site`` (from essd_site_info), ``$instance`` (hidden, follows the site),
    ``$currency`` (hidden) and optionally ``$device`` (every device, the meter included)."""
    every = VariableOption(selected=True, text=["All"], value=["$__all"])
    site = (
        dashboard.QueryVariable("site")
        .label("Site")
        .query("label_values(essd_site_info, site)")
        .datasource(DS)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    if all_sites:
        site = site.multi(True).include_all(True).current(every)
    board = board.with_variable(site)
    for name, query in (
        ("instance", 'label_values(essd_site_info{site=~"$site"}, instance)'),
        ("currency", 'label_values(essd_site_info{site=~"$site"}, currency)'),
    ):
        board = board.with_variable(
            dashboard.QueryVariable(name)
            .query(query)
            .datasource(DS)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .current(every)
            .hide(VariableHide.HIDE_VARIABLE)
        )
    if devices:
        board = board.with_variable(
            dashboard.QueryVariable("device")
            .label("Device")
            .query(f"label_values(essd_device_info{{{I}}}, device)")
            .datasource(DS)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .current(every)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
    return board


def base(uid: str, title: str, description: str, *, when: str = "now-6h") -> Any:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["essd", "energy", "battery"])
        .refresh("10s")
        .time(when, "now")
        .timezone("browser")
        .tooltip(1)
        .editable()
    )


def add(board: Any, row: str, panels: Iterable[Panel], *, repeat: str = "") -> Any:
    r = dashboard.Row(row)
    if repeat:
        r = r.repeat(repeat)
    board = board.with_row(r)
    for p in panels:
        board = board.with_panel(p)
    return board


def kwh(metric: str) -> str:
    return f"increase({sel(metric)}[$__range]) / 3.6e6"


def energy_stats(when: str, label: str) -> list[Panel]:
    """Energy, cost, savings and carbon of the period ``when`` (``now/d``, ``now/M``) so far."""
    return [
        st(
            f"Energy {label}",
            "kwatth",
            [
                q(kwh("essd_site_imported_energy_joules_total"), "imported"),
                q(kwh("essd_site_exported_energy_joules_total"), "exported"),
                q(kwh("essd_site_battery_charged_energy_joules_total"), "battery charged"),
                q(kwh("essd_site_battery_discharged_energy_joules_total"), "battery discharged"),
                q(kwh("essd_site_pv_energy_joules_total"), "PV (measured)"),
            ],
            span=10,
            when=when,
        ),
        st(
            f"Cost and savings {label} ($currency)",
            "none",
            [
                q(f"delta({sel('essd_site_cost')}[$__range])", "cost"),
                q(f"delta({sel('essd_site_savings')}[$__range])", "saved by the batteries"),
            ],
            span=8,
            when=when,
        ),
        st(
            f"CO2 {label}",
            "masskg",
            [q(f"delta({sel('essd_site_co2_grams')}[$__range]) / 1000", "CO2")],
            span=6,
            when=when,
        ),
    ]


def site_overview() -> Any:
    """The site's energy: what a homeowner or site manager looks at."""
    b = base(
        "essd-site",
        "essd site overview",
        "The site's energy: power flows, SoC, prices, the plan, energy, cost, savings and "
        "carbon today and this month, the billing peak. Battery W > 0 discharges; grid W > 0 "
        "imports.",
        when="now-24h",
    )
    b = variables(b, devices=False, all_sites=False)
    soc = (
        f"sum({sel('essd_device_soc_ratio')} * on (instance, device) "
        f"{sel('essd_device_capacity_joules')}) / sum({sel('essd_device_capacity_joules')} "
        f"and on (instance, device) {sel('essd_device_soc_ratio')})"
    )
    b = add(
        b,
        "Now",
        [
            st("Grid power", "watt", [q(sel("essd_grid_power_watts"), "grid")]),
            st(
                "Battery power (all units)",
                "watt",
                [q(f"sum({sel('essd_device_power_watts')})", "batteries")],
            ),
            st("Net load (load - unmeasured PV)", "watt", [q(sel("essd_site_net_load_watts"))]),
            st("Site SoC", "percentunit", [q(soc, "SoC")]),
            st(
                "Import price ($currency/kWh)",
                "none",
                [q(sel("essd_tariff_import_price_per_kwh"), "import")],
            ),
            st(
                "Grid carbon intensity (g/kWh)",
                "none",
                [q(sel("essd_grid_carbon_intensity_grams_per_kwh"), "carbon")],
            ),
        ],
    )
    b = add(
        b,
        "Power flows",
        [
            ts(
                "Power flows",
                "watt",
                [
                    q(sel("essd_grid_power_watts"), "grid (> 0 imports)"),
                    q(sel("essd_site_net_load_watts"), "net load"),
                    q(
                        f"{sel('essd_site_pv_power_watts')} or {sel('essd_forecast_pv_watts')}",
                        "PV (measured, else forecast)",
                    ),
                    q(sel("essd_device_power_watts"), "{{device}} (> 0 discharges)"),
                ],
                span=24,
                h=9,
            ),
            ts("SoC per battery", "percentunit", [q(sel("essd_device_soc_ratio"), "{{device}}")]),
            ts(
                "Price ($currency/kWh) and carbon (g/kWh)",
                "none",
                [
                    q(sel("essd_tariff_import_price_per_kwh"), "import price"),
                    q(sel("essd_tariff_export_price_per_kwh"), "export price"),
                    q(sel("essd_grid_carbon_intensity_grams_per_kwh") + " / 1000", "carbon kg/kWh"),
                ],
            ),
        ],
    )
    b = add(
        b,
        "The plan",
        [
            ts(
                "Plan against what happened",
                "watt",
                [
                    q(sel("essd_plan_grid_power_watts"), "grid, planned"),
                    q(sel("essd_grid_power_watts"), "grid, measured"),
                    q(f"sum({sel('essd_device_plan_power_watts')})", "batteries, planned"),
                    q(f"sum({sel('essd_device_power_watts')})", "batteries, measured"),
                ],
            ),
            bars(
                "Plan ahead: battery power per hour (> 0 discharges)",
                "watt",
                [q(sel("essd_plan_ahead_battery_power_watts"), "+{{hours_ahead}} h")],
                span=6,
            ),
            bars(
                "Plan ahead: grid power per hour (> 0 imports)",
                "watt",
                [q(sel("essd_plan_ahead_grid_power_watts"), "+{{hours_ahead}} h")],
                span=6,
            ),
            bars(
                "Forecast ahead: net load per hour",
                "watt",
                [q(sel("essd_forecast_ahead_net_load_watts"), "+{{hours_ahead}} h")],
                span=8,
            ),
            bars(
                "Forecast ahead: PV per hour",
                "watt",
                [q(sel("essd_forecast_ahead_pv_watts"), "+{{hours_ahead}} h")],
                span=8,
            ),
            bars(
                "Plan ahead: import price per hour ($currency/kWh)",
                "none",
                [q(sel("essd_plan_ahead_import_price_per_kwh"), "+{{hours_ahead}} h")],
                span=8,
            ),
        ],
    )
    b = add(b, "Today so far", energy_stats("now/d", "today"))
    b = add(b, "This month so far", energy_stats("now/M", "this month"))
    return add(
        b,
        "Billing peak and alarms",
        [
            ts(
                "Billing peak vs import limit",
                "watt",
                [
                    q(sel("essd_billing_peak_import_watts"), "billing peak (this period)"),
                    q(sel("essd_grid_import_limit_watts"), "import limit"),
                    q(sel("essd_grid_power_watts"), "grid"),
                ],
            ),
            st(
                "Battery alarms",
                "none",
                [q(sel("essd_device_alarms"), "{{device}}")],
                span=6,
                h=8,
            ),
            st(
                "Device state",
                "none",
                [q(f"{sel('essd_device_state')} == 1", "{{device}}: {{state}}")],
                span=6,
                h=8,
            ),
        ],
    )


def control_health() -> Any:
    """The control loop, the solver and each device's link: what an operator watches."""
    b = base(
        "essd-overview",
        "essd control loop",
        "essd control-loop health: cycles, fallback rungs, the solver, setpoints and Modbus "
        "per device. Battery W > 0 discharges; grid W > 0 imports.",
    )
    b = variables(b, devices=True, all_sites=False)
    b = add(
        b,
        "Overview",
        [
            st("Fallback rung", "none", [q(sel("essd_plan_rung"), "rung")]),
            st(
                "Devices up",
                "none",
                [
                    q(f"sum({sel('essd_device_up')})", "up"),
                    q(f"count({sel('essd_device_up')})", "configured"),
                ],
            ),
            st("MQTT connected", "bool", [q(sel("essd_mqtt_connected"), "MQTT")]),
            st("Cost since start ($currency)", "none", [q(sel("essd_site_cost"), "cost")]),
            st("CO2 since start", "masskg", [q(sel("essd_site_co2_grams") + " / 1000", "CO2")]),
            st(
                "Energy since start",
                "kwatth",
                [
                    q(sel("essd_site_imported_energy_joules_total") + " / 3.6e6", "imported"),
                    q(sel("essd_site_exported_energy_joules_total") + " / 3.6e6", "exported"),
                ],
            ),
            ts(
                "Grid power vs limits",
                "watt",
                [
                    q(sel("essd_grid_power_watts"), "grid"),
                    q(sel("essd_plan_grid_power_watts"), "planned"),
                    q(sel("essd_guard_predicted_grid_watts"), "guard prediction"),
                    q(sel("essd_grid_import_limit_watts"), "import limit"),
                    q("-" + sel("essd_grid_export_limit_watts"), "export limit"),
                ],
            ),
            ts(
                "Limit unmet and meter plausibility",
                "watt",
                [
                    q(sel("essd_site_limit_unmet_watts"), "limit unmet"),
                    q(sel("essd_site_limit_margin_watts"), "margin kept"),
                ],
            ),
        ],
    )
    b = add(
        b,
        "Device $device",
        [
            ts(
                "SoC and window",
                "percentunit",
                [
                    q(f"essd_device_soc_ratio{{{ID}}}", "{{device}} SoC"),
                    q(f"essd_device_soc_reserve_ratio{{{ID}}}", "{{device}} reserve"),
                    q(f"essd_device_soc_max_ratio{{{ID}}}", "{{device}} max"),
                ],
            ),
            ts(
                "Power, setpoint, limits",
                "watt",
                [
                    q(f"essd_device_power_watts{{{ID}}}", "{{device}} measured"),
                    q(f"essd_device_setpoint_watts{{{ID}}}", "{{device}} setpoint"),
                    q(f"essd_device_plan_power_watts{{{ID}}}", "{{device}} planned"),
                    q(f"essd_device_max_discharge_watts{{{ID}}}", "{{device}} max discharge"),
                    q(f"-essd_device_max_charge_watts{{{ID}}}", "{{device}} max charge"),
                ],
            ),
            st(
                "State",
                "none",
                [
                    q(f"essd_device_state{{{ID}}} == 1", "{{device}}: {{state}}"),
                    q(f"essd_device_up{{{ID}}}", "{{device}} up"),
                ],
                span=8,
                h=8,
            ),
            ts(
                "Setpoint age vs TTL",
                "s",
                [
                    q(f"essd_device_setpoint_age_seconds{{{ID}}}", "{{device}} age"),
                    q(f"essd_device_setpoint_ttl_seconds{{{ID}}}", "{{device}} TTL"),
                ],
                span=8,
            ),
            ts(
                "Write failures in a row",
                "none",
                [q(f"essd_device_write_failures{{{ID}}}", "{{device}}")],
                span=8,
            ),
            ts(
                "Modbus requests, errors, writes",
                "reqps",
                [
                    q(
                        f"rate(essd_device_modbus_requests_total{{{ID}}}[$__rate_interval])",
                        "{{device}} requests",
                    ),
                    q(
                        "sum by (instance, device, kind) "
                        f"(rate(essd_device_modbus_errors_total{{{ID}}}[$__rate_interval]))",
                        "{{device}} errors {{kind}}",
                    ),
                    q(
                        f"rate(essd_device_modbus_writes_total{{{ID}}}[$__rate_interval])",
                        "{{device}} writes",
                    ),
                ],
                span=8,
            ),
            ts(
                "Read-back mismatches",
                "none",
                [
                    q(
                        f"increase(essd_device_readback_mismatches_total{{{ID}}}[$__rate_interval])",
                        "{{device}}",
                    )
                ],
                span=8,
            ),
            ts(
                "Modbus latency",
                "s",
                [
                    q(
                        "histogram_quantile(0.5, sum by (instance, device, le) (rate("
                        f"essd_device_modbus_latency_seconds_bucket{{{ID}}}[$__rate_interval])))",
                        "{{device}} p50",
                    ),
                    q(
                        "histogram_quantile(0.95, sum by (instance, device, le) (rate("
                        f"essd_device_modbus_latency_seconds_bucket{{{ID}}}[$__rate_interval])))",
                        "{{device}} p95",
                    ),
                ],
                span=8,
            ),
        ],
        repeat="device",
    )
    rate = "[$__rate_interval]"
    b = add(
        b,
        "Control loop",
        [
            ts(
                "Cycle duration",
                "s",
                [
                    q(
                        "histogram_quantile(0.5, sum by (instance, le) "
                        f"(rate({sel('essd_cycle_duration_seconds_bucket')}{rate})))",
                        "p50",
                    ),
                    q(
                        "histogram_quantile(0.99, sum by (instance, le) "
                        f"(rate({sel('essd_cycle_duration_seconds_bucket')}{rate})))",
                        "p99",
                    ),
                    q(sel("essd_cycle_period_seconds"), "period"),
                ],
            ),
            ts(
                "Mean phase duration",
                "s",
                [
                    q(
                        "sum by (instance, phase) "
                        f"(rate({sel('essd_cycle_phase_duration_seconds_sum')}{rate})) / "
                        "sum by (instance, phase) "
                        f"(rate({sel('essd_cycle_phase_duration_seconds_count')}{rate}))",
                        "{{phase}}",
                    )
                ],
            ),
            ts(
                "Overruns per interval",
                "none",
                [q(f"increase({sel('essd_cycle_overruns_total')}{rate})", "overruns")],
                span=8,
            ),
            ts(
                "Cycle rate",
                "cpm",
                [q(f"rate({sel('essd_cycle_duration_seconds_count')}{rate}) * 60", "cycles")],
                span=8,
            ),
            ts(
                "Time since last cycle",
                "s",
                [
                    q(sel("essd_cycle_age_seconds"), "age"),
                    q(sel("essd_cycle_period_seconds"), "period"),
                ],
                span=8,
            ),
            ts(
                "essd process CPU",
                "percentunit",
                [
                    q(
                        f"rate(process_cpu_seconds_total{{{I}}}{rate}) "
                        f"and on (job, instance) {sel('essd_build_info')}",
                        "CPU",
                    )
                ],
            ),
            ts(
                "essd process memory",
                "bytes",
                [
                    q(
                        f"process_resident_memory_bytes{{{I}}} "
                        f"and on (job, instance) {sel('essd_build_info')}",
                        "resident",
                    )
                ],
            ),
            ts(
                "Operator commands per interval",
                "none",
                [
                    q(
                        "sum by (instance, command, result) "
                        f"(increase({sel('essd_commands_total')}{rate}))",
                        "{{command}} {{result}}",
                    )
                ],
                span=24,
            ),
        ],
    )
    return add(
        b,
        "Solver",
        [
            ts(
                "Solve duration",
                "s",
                [
                    q(
                        "histogram_quantile(0.5, sum by (instance, le) "
                        f"(rate({sel('essd_solve_duration_seconds_bucket')}{rate})))",
                        "p50",
                    ),
                    q(
                        "histogram_quantile(0.95, sum by (instance, le) "
                        f"(rate({sel('essd_solve_duration_seconds_bucket')}{rate})))",
                        "p95",
                    ),
                ],
            ),
            ts("Fallback rung over time", "none", [q(sel("essd_plan_rung"), "rung")]),
            bars(
                "Cycles by rung (1 h)",
                "none",
                [
                    q(
                        f"sum by (rung) (increase({sel('essd_plan_rung_cycles_total')}[1h]))",
                        "rung {{rung}}",
                    )
                ],
                span=8,
            ),
            st(
                "Solver status and plan reason",
                "none",
                [
                    q(f"{sel('essd_solver_status')} == 1", "{{status}}"),
                    q(f"{sel('essd_plan_reason')} == 1", "{{reason}}"),
                ],
                span=8,
                h=8,
            ),
            ts(
                "Solver failures per interval",
                "none",
                [
                    q(
                        "sum by (instance, cause) "
                        f"(increase({sel('essd_solver_failures_total')}{rate}))",
                        "{{cause}}",
                    ),
                    q(sel("essd_solver_failures_consecutive"), "in a row"),
                ],
                span=8,
            ),
            ts(
                "Plan objective ($currency over the horizon)",
                "none",
                [q(sel("essd_plan_objective"), "objective")],
                span=24,
            ),
        ],
    )


def fleet() -> Any:
    """Every site, one row each."""
    b = base(
        "essd-fleet",
        "essd fleet",
        "Every essd site, one row each: state of charge, power, rung, devices down, cost and "
        "savings over the last 24 h, billing peak against the import limit.",
        when="now-24h",
    )
    b = variables(b, devices=False, all_sites=True)
    soc = (
        f"sum by (instance) ({sel('essd_device_soc_ratio')} * on (instance, device) "
        f"{sel('essd_device_capacity_joules')}) / sum by (instance) "
        f"({sel('essd_device_capacity_joules')} and on (instance, device) "
        f"{sel('essd_device_soc_ratio')})"
    )
    columns = [
        (f"max by (instance, site, currency) ({sel('essd_site_info')})", "site"),
        (soc, "SoC"),
        (f"max by (instance) ({sel('essd_grid_power_watts')})", "grid W"),
        (f"sum by (instance) ({sel('essd_device_power_watts')})", "batteries W"),
        (f"max by (instance) ({sel('essd_plan_rung')})", "rung"),
        (f"sum by (instance) (1 - {sel('essd_device_up')})", "devices down"),
        (f"max by (instance) (delta({sel('essd_site_cost')}[1d]))", "cost 24 h"),
        (f"max by (instance) (delta({sel('essd_site_savings')}[1d]))", "saved 24 h"),
        (
            f"max by (instance) ({sel('essd_billing_peak_import_watts')} / "
            f"{sel('essd_grid_import_limit_watts')})",
            "billing peak / limit",
        ),
    ]
    panel = (
        table.Panel()
        .title("Sites")
        .span(24)
        .height(12)
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
    )
    panel = _targets(panel, [q(expr, legend, instant=True) for expr, legend in columns])
    return add(b, "Fleet", [panel])


DASHBOARDS: dict[str, Callable[[], Any]] = {
    "essd-site.json": site_overview,
    "essd.json": control_health,
    "essd-fleet.json": fleet,
}


def render(build: Callable[[], Any]) -> str:
    """One dashboard as the JSON text written to disk."""
    data = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(build().build()))
    n = 0
    for panel in data.get("panels", []):  # ids in reading order, rows' nested panels included
        for p in (panel, *panel.get("panels", [])):
            n += 1
            p["id"] = n
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) every dashboard; exit 1 when one differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    for name in stale:
        sys.stderr.write(f"{OUT / name}: differs from the generator: run `make dashboards`\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
