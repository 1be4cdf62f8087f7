"""Cost of observability: handling a cycle event (in the control loop's thread) and a scrape
(in the HTTP thread), for the 4-device fake site and for a 50-device site."""

from __future__ import annotations

import time
import urllib.request

from benchmarks import Result
from essd.clock import SimClock
from essd.domain import DeviceClass
from essd.metrics import MetricsExporter, MetricsServer
from tests.support.prometheus import SITE_DEVICES, FakeDevice, FakeSite

ROUNDS = 200


def _site(clock: SimClock, devices: int) -> FakeSite:
    if devices == len(SITE_DEVICES):
        return FakeSite(clock)
    fleet = tuple(
        FakeDevice(f"unit{i:02d}", DeviceClass.INDUSTRIAL, 100_000.0, 50_000.0, 0.5)
        for i in range(devices)
    )
    return FakeSite(clock, devices=fleet, import_limit_w=devices * 60_000.0)


def _measure(devices: int) -> list[Result]:
    clock = SimClock()
    exporter = MetricsExporter(clock=clock)
    site = _site(clock, devices)
    for ev in site.startup_events():
        exporter.handle(ev)
    events = [site.next_event() for _ in range(ROUNDS)]
    started = time.perf_counter()
    for ev in events:
        exporter.handle(ev)
    handle_s = (time.perf_counter() - started) / ROUNDS
    started = time.perf_counter()
    for _ in range(ROUNDS // 4):
        body = exporter.exposition()
    scrape_s = (time.perf_counter() - started) / (ROUNDS // 4)
    server = MetricsServer(exporter.registry, port=0)
    server.start_sync()
    try:
        started = time.perf_counter()
        for _ in range(ROUNDS // 4):
            with urllib.request.urlopen(server.url, timeout=5) as resp:
                resp.read()
        http_s = (time.perf_counter() - started) / (ROUNDS // 4)
    finally:
        server.stop_sync()
    tag = f"metrics.{devices}_devices"
    return [
        Result(f"{tag}.handle_cycle_event", handle_s * 1e6, "us"),
        Result(f"{tag}.render_scrape", scrape_s * 1e3, "ms"),
        Result(f"{tag}.http_scrape", http_s * 1e3, "ms"),
        Result(f"{tag}.scrape_size", len(body) / 1024.0, "KiB"),
        Result(f"{tag}.series", float(body.count(b"\n") - body.count(b"\n#")), "series"),
    ]


def run() -> list[Result]:
    """Per-event and per-scrape costs for 4 and 50 devices."""
    return _measure(len(SITE_DEVICES)) + _measure(50)
