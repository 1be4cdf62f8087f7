"""Cost of observability: handling a cycle event and a scrape, for the 4-device fake site and
for a 50-device site; and what a flood of scrapes does to the control cycle of a 100-unit site.

The flood figure runs the real controller against hil_sim (as ``bench_daemon`` does) with the
exporter and the metrics server on the same event loop, as in the daemon, and compares the
cycle's p99 without and with a client process hammering ``/metrics`` over a few keep-alive
connections as fast as it can (uncompressed, the heavier answer to send).
"""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import statistics
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

from benchmarks import Result
from benchmarks.bench_daemon import WARMUP, _many_devices, _percentile, _serve
from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import MetricsConfig, Settings
from essd.daemon import build_controller
from essd.domain import DeviceClass
from essd.events import EventBus
from essd.metrics import MetricsExporter, MetricsServer
from tests.support.prometheus import SITE_DEVICES, FakeDevice, FakeSite

ROUNDS = 200
# Quiet and flooded blocks alternate: 6 x (5 + 5) cycles after the warm-up.
FLOOD_BLOCKS = 6
FLOOD_BLOCK = 5
FLOOD_CONNECTIONS = 4


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
    # Unpaced: this measures what answering costs, not the pacing between answers.
    server = MetricsServer(exporter.exposition_cache, port=0, max_scrapes_per_s=0)
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


def _flood(port: int, go: EventType, conn: Connection) -> None:
    """Child process: while ``go`` is set, scrape ``/metrics`` on a few keep-alive connections
    as fast as answers come; on any message, stop and send back the number of scrapes."""
    stop = threading.Event()
    counts = [0] * FLOOD_CONNECTIONS

    def hammer(i: int) -> None:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            if not go.wait(0.1):
                continue
            client.request("GET", "/metrics")
            with client.getresponse() as resp:
                resp.read()
            counts[i] += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(FLOOD_CONNECTIONS)]
    for t in threads:
        t.start()
    conn.recv()
    stop.set()
    for t in threads:
        t.join()
    conn.send(sum(counts))


async def _flood_cycles(
    settings: Settings, max_scrapes_per_s: float
) -> tuple[list[float], list[float], float, float]:
    """Cycle wall times (s) without and with a scrape flood, the flood's scrapes per second
    and the registry renders per flooded cycle.

    Quiet and flooded cycles alternate in blocks, so both see the same site (devices that
    degrade as the simulated time runs on) and the same background load.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    sim = ctx.Process(target=_serve, args=(settings.model_dump_json(), child), daemon=True)
    sim.start()
    quiet: list[float] = []
    flooded: list[float] = []
    flood_s = 0.0
    renders = 0
    try:
        served = Settings.model_validate_json(parent.recv())
        clock = SimClock(1_782_900_000.0)
        bus = EventBus()
        exporter = MetricsExporter.from_settings(served, clock=clock)
        exporter.attach(bus)
        cache = exporter.exposition_cache
        pool = EndpointPool(clock=clock)
        ctl = build_controller(served, clock=clock, bus=bus, pool=pool)
        config = served.metrics.model_copy(
            update={"bind": "127.0.0.1", "port": 0, "max_scrapes_per_s": max_scrapes_per_s}
        )

        async def cycles(n: int, out: list[float]) -> None:
            for _ in range(n):
                event = await ctl.run_cycle()
                clock.advance(settings.control.cycle_period_s)
                out.append(event.duration_s)

        try:
            async with MetricsServer.from_config(cache, config) as server:
                go = ctx.Event()
                flood_parent, flood_child = ctx.Pipe()
                flood = ctx.Process(target=_flood, args=(server.port, go, flood_child), daemon=True)
                flood.start()
                await cycles(WARMUP, [])
                for _ in range(FLOOD_BLOCKS):
                    await cycles(FLOOD_BLOCK, quiet)
                    go.set()
                    before = cache.renders
                    started = time.perf_counter()
                    await cycles(FLOOD_BLOCK, flooded)
                    flood_s += time.perf_counter() - started
                    renders += cache.renders - before
                    go.clear()
                flood_parent.send("stop")
                scrapes = await asyncio.to_thread(flood_parent.recv)
                flood.join(10)
        finally:
            await pool.close()
    finally:
        parent.send("stop")
        sim.join(10)
    assert isinstance(scrapes, int)
    return quiet, flooded, scrapes / flood_s, renders / len(flooded)


def scrape_flood(*, unpaced: bool = True) -> list[Result]:
    """Cycle p99 of a 100-unit site without and with a scrape flood, and their ratio, with the
    default ``metrics.max_scrapes_per_s``; then the same with no pacing (what the loop pays for
    answering as fast as a client asks)."""
    results: list[Result] = []
    default = MetricsConfig().max_scrapes_per_s
    for limit, tag in [(default, ""), (0.0, ".unpaced")][: 2 if unpaced else 1]:
        quiet, flooded, rate, renders = asyncio.run(_flood_cycles(_many_devices(99), limit))
        p99_quiet = _percentile(quiet, 99) * 1000
        p99_flood = _percentile(flooded, 99) * 1000
        name = f"metrics.scrape_flood{tag}"
        results += [
            Result(f"{name}.cycle_p50_ms.quiet", statistics.median(quiet) * 1000, "ms"),
            Result(f"{name}.cycle_p50_ms.flood", statistics.median(flooded) * 1000, "ms"),
            Result(f"{name}.cycle_p99_ms.quiet", p99_quiet, "ms (100 units)"),
            Result(f"{name}.cycle_p99_ms.flood", p99_flood, "ms (100 units)"),
            Result(f"{name}.scrapes_per_s", rate, "scrapes/s answered"),
            Result(f"{name}.renders_per_cycle", renders, "renders"),
            Result(f"metrics.scrape_flood_cycle_ratio{tag}", p99_flood / p99_quiet, "x"),
        ]
    return results


def run() -> list[Result]:
    """Per-event and per-scrape costs for 4 and 50 devices; the scrape flood's cost."""
    return _measure(len(SITE_DEVICES)) + _measure(50) + scrape_flood()
