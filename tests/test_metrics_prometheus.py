"""A real Prometheus scrapes essd's metrics endpoint; every dashboard and alert expression runs
against it through the HTTP API.

The target is a running ``essd demo`` (the daemon on the simulated example site, publishing
to a real mosquitto so the MQTT panels have data too).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.demo import running_demo
from tests.support.mosquitto import Mosquitto
from tests.support.prometheus import (
    ALERTS,
    PanelQuery,
    PrometheusServer,
    alert_rules,
    dashboard_queries,
    expand_grafana,
    http_get,
    program,
    running_prometheus,
    wait_for_metrics,
)

pytestmark = pytest.mark.slow

DATA_TIMEOUT_S = 25.0


@pytest.fixture
def metrics_target(tmp_path: Path) -> Iterator[str]:
    """``host:port`` of a running ``essd demo``'s /metrics endpoint."""
    broker = Mosquitto(tmp_path)
    broker.start()
    env = {"ESSD_MQTT__HOST": broker.host, "ESSD_MQTT__PORT": str(broker.port)}
    try:
        with running_demo("--speed", "60", env=env) as (_, url):
            wait_for_metrics(url)
            yield url.removeprefix("http://").removesuffix("/metrics")
    finally:
        broker.stop()


@pytest.fixture
def prometheus(metrics_target: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    with running_prometheus(metrics_target, tmp_path, rule_files=(ALERTS,)) as prom:
        yield prom


def _empty(prom: PrometheusServer, queries: list[PanelQuery]) -> list[PanelQuery]:
    return [q for q in queries if not prom.query(expand_grafana(q.expr))["data"]["result"]]


def test_every_dashboard_query_parses_and_returns_data(prometheus: PrometheusServer) -> None:
    queries = dashboard_queries()  # the three generated dashboards
    assert len(queries) >= 90
    assert {q.panel.split(": ", 1)[0] for q in queries} == {
        "essd site overview",
        "essd control loop",
        "essd fleet",
    }
    for q in queries:
        answer = prometheus.query(expand_grafana(q.expr))
        assert answer["status"] == "success", (q, answer)
    # Rates and increases need a few scrapes (1 s apart) inside their window first.
    deadline = time.monotonic() + DATA_TIMEOUT_S
    empty = _empty(prometheus, queries)
    while empty and time.monotonic() < deadline:
        time.sleep(1.0)
        empty = _empty(prometheus, empty)
    assert not empty, "\n".join(f"{q.panel} [{q.ref_id}]: {q.expr}" for q in empty)
    # The data came from the scrape target, and the per-device panels see all four batteries.
    up = prometheus.query('up{job="essd"}')["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]
    soc = prometheus.query(expand_grafana('essd_device_soc_ratio{device=~"$device"}'))
    assert {r["metric"]["device"] for r in soc["data"]["result"]} == {
        "pcs1",
        "home-a",
        "home-b",
        "camp1",
    }


def test_every_alert_expression_parses_and_every_rule_evaluates(
    prometheus: PrometheusServer,
) -> None:
    rules = alert_rules()
    for rule in rules:
        answer = prometheus.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)
    # The server loaded alerts.yml and evaluates every rule without error.
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while True:
        groups = prometheus.api("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(r.get("health") == "ok" for r in loaded.values())
        if (loaded and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(loaded) == {r["alert"] for r in rules}
    bad = {name: (r.get("health"), r.get("lastError")) for name, r in loaded.items()}
    assert all(h == "ok" for h, _ in bad.values()), bad


def test_promtool_check_metrics_is_clean_on_the_running_demo(metrics_target: str) -> None:
    deadline = time.monotonic() + 30
    body = http_get(f"http://{metrics_target}/metrics")
    while b"essd_device_soc_ratio" not in body and time.monotonic() < deadline:
        time.sleep(0.5)  # the first cycles are still running
        body = http_get(f"http://{metrics_target}/metrics")
    assert b"essd_cycle_duration_seconds_bucket" in body
    assert b'essd_device_soc_ratio{device="pcs1"' in body
    out = subprocess.run(
        [program("promtool"), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == b""
    assert out.stderr.strip() == b""
