"""Alert rules and the Grafana dashboard: promtool, structure, and names the exporter serves."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from essd.clock import SimClock
from essd.events import EventBus
from essd.metrics import MetricsExporter
from tests.support.prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARDS,
    DATASOURCE_UID,
    OBSERVABILITY,
    PROMETHEUS_EXAMPLE,
    FakeSite,
    alert_rules,
    all_panels,
    dashboard,
    dashboard_queries,
    program,
)

PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; output in the assertion message on failure."""
    return subprocess.run(
        [program("promtool"), *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS_EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"


def test_every_alert_names_severity_and_explains_itself() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_every_alert_waits_and_has_a_runbook_line() -> None:
    doc = (OBSERVABILITY.parent / "docs" / "observability.md").read_text()
    runbook = doc[doc.index("### Runbook") :]
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no for:"
        assert f"- **{rule['alert']}**: " in runbook, rule["alert"]
        assert f"| `{rule['alert']}` |" in doc, rule["alert"]


@pytest.mark.parametrize(
    "alert",
    [
        "EssdSiteLimitExceeded",
        "EssdDeviceFault",
        "EssdDeviceWriteFailing",
        "EssdSolverFailing",
        "EssdSolverFailingInARow",
    ],
)
def test_the_alerts_the_operators_asked_for_exist(alert: str) -> None:
    assert alert in {r["alert"] for r in alert_rules()}


# ------------------------------------------------------------------------------ dashboard


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_uses_the_provisioned_datasource(name: str) -> None:
    dash = dashboard(name)
    for panel in all_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in dash["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_query_of_every_panel_selects_the_site(name: str) -> None:
    # Several sites in one Prometheus never mix: every metric selector carries the
    # instance of the chosen site.
    for q in dashboard_queries(dashboard(name)):
        for selector in re.findall(r"\b((?:essd|process)_[a-z0-9_]+)(\{[^}]*\})?", q.expr):
            assert 'instance=~"$instance"' in selector[1], (q.panel, q.expr)


@pytest.mark.parametrize("name", DASHBOARDS)
def test_no_increase_on_a_rate_axis_and_money_names_its_currency(name: str) -> None:
    for panel in all_panels(dashboard(name)):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if unit in ("reqps", "ops", "cps"):
            assert not any("increase(" in e for e in exprs), panel["title"]
        if any(m in e for e in exprs for m in ("essd_site_cost", "essd_site_savings")):
            # In the title, or (the fleet table, one currency per site) a column of its own.
            named = "$currency" in panel["title"] or any(
                "essd_site_info" in e and "currency" in e for e in exprs
            )
            assert named, panel["title"]


def test_the_device_variable_lists_every_device_including_the_meter() -> None:
    (device,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "device"]
    assert "essd_device_info" in device["query"]  # served for the meter too
    assert 'instance=~"$instance"' in device["query"]


def test_dashboard_layout() -> None:
    dash = dashboard()
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p for p in panels if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Overview", "Device $device", "Control loop", "Solver"]
    assert rows[1]["repeat"] == "device"
    # Every panel between the device row and the next row filters on the device variable.
    start = panels.index(rows[1])
    end = panels.index(rows[2])
    for panel in panels[start + 1 : end]:
        for target in panel["targets"]:
            assert 'device=~"$device"' in target["expr"], panel["title"]
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_provisioning_files_point_at_the_dashboard_and_datasource() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "essd.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


# -------------------------------------------------- every referenced metric is really served

_NAME = re.compile(r"\b((?:essd|process|python)_[a-z0-9_]+)\b")
_SUFFIXES = ("_bucket", "_sum", "_count")


def referenced_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (histogram series mapped to their family)."""
    names = set()
    for found in _NAME.findall(expr):
        name = found
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        names.add(name)
    return names


@pytest.fixture(scope="module")
def served() -> dict[str, str]:
    """Family name -> type of everything the exporter serves for a busy fake site."""
    clock = SimClock()
    exporter = MetricsExporter(clock=clock, site_id="plant-7", currency="EUR")
    bus = EventBus()
    exporter.attach(bus)
    site = FakeSite(clock)
    for ev in site.startup_events():
        bus.publish(ev)
    for _ in range(12):
        bus.publish(site.next_event())
        clock.advance(1.0)
    out = {}
    for fam in text_string_to_metric_families(exporter.exposition().decode()):
        if fam.name.endswith("_created"):
            continue  # creation timestamps of counters and histograms, not queried
        # The parser drops the _total and _info suffixes from family names; series keep them.
        suffix = {"counter": "_total", "info": "_info"}.get(fam.type, "")
        out[fam.name + suffix] = fam.type
    return out


def test_every_dashboard_metric_is_served(served: dict[str, str]) -> None:
    for q in dashboard_queries():
        missing = referenced_metrics(q.expr) - served.keys()
        assert not missing, f"{q.panel}: {missing}"


def test_every_alert_metric_is_served(served: dict[str, str]) -> None:
    for rule in alert_rules():
        missing = referenced_metrics(rule["expr"]) - served.keys()
        assert not missing, f"{rule['alert']}: {missing}"


def test_rates_are_taken_of_counters_and_histograms_only(served: dict[str, str]) -> None:
    exprs: list[Any] = [q.expr for q in dashboard_queries()] + [r["expr"] for r in alert_rules()]
    for expr in exprs:
        for name in re.findall(r"(?:rate|increase)\((\w+)", expr):
            family = referenced_metrics(name).pop()
            assert served[family] in ("counter", "histogram"), (expr, served[family])


def test_every_served_metric_is_documented(served: dict[str, str]) -> None:
    doc = (OBSERVABILITY.parent / "docs" / "observability.md").read_text()
    undocumented = sorted(
        name for name in served if name.startswith("essd_") and f"`{name}`" not in doc
    )
    assert undocumented == []
