"""A real Prometheus scrapes essd's metrics endpoint; every dashboard and alert expression runs
against it through the HTTP API.

The target is a :class:`MetricsServer` fed by a fake 4-device site on the event bus (the same
frozen events the daemon publishes). Only the ``metrics_target`` fixture knows that: pointing
it at a running ``essd demo --no-tui --metrics-port P`` instead changes nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from essd.clock import RealClock
from essd.events import EventBus
from essd.metrics import MetricsExporter, MetricsServer
from tests.support.prometheus import (
    ALERTS,
    FakeSite,
    PanelQuery,
    PrometheusServer,
    SiteFeeder,
    alert_rules,
    dashboard_queries,
    expand_grafana,
    running_prometheus,
    wait_for_metrics,
)

pytestmark = pytest.mark.slow

DATA_TIMEOUT_S = 25.0


@pytest.fixture
def metrics_target() -> Iterator[str]:
    """``host:port`` of a live /metrics endpoint with a busy site behind it."""
    clock = RealClock()
    exporter = MetricsExporter(clock=clock, site_id="demo", currency="CNY", default_max_soc=0.95)
    bus = EventBus()
    exporter.attach(bus)
    server = MetricsServer(exporter.registry, port=0)
    server.start_sync()
    try:
        with SiteFeeder(FakeSite(clock, period_s=0.5), bus, interval_s=0.5):
            wait_for_metrics(server.url)
            yield f"127.0.0.1:{server.port}"
    finally:
        server.stop_sync()


@pytest.fixture
def prometheus(metrics_target: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    with running_prometheus(metrics_target, tmp_path, rule_files=(ALERTS,)) as prom:
        yield prom


def _empty(prom: PrometheusServer, queries: list[PanelQuery]) -> list[PanelQuery]:
    return [q for q in queries if not prom.query(expand_grafana(q.expr))["data"]["result"]]


def test_every_dashboard_query_parses_and_returns_data(prometheus: PrometheusServer) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
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
        "pcs2",
        "hybrid1",
        "portable1",
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
