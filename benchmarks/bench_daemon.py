"""Control-cycle cost over real loopback Modbus: 4 devices (the example site) and 100 devices.

The 100-device site is 99 units of one model plus a meter, planned with
``control.aggregate_identical_units`` (one battery in the LP, the plan shared by the units).
``cycle.phase_p50_ms`` / ``cycle.phase_p99_ms`` split each cycle into its phases.

Devices are served by hil_sim in a separate process, as real units answer from their own
hardware; the cycle's cost is reading, solving, guarding and writing, which this measures.
Each cycle runs on a stepped simulated clock that the simulator follows, back to back, so the
figures are compute time; between cycles (not measured, as the daemon's sleep) the look-ahead
solve of the next step's LP completes (``cycle.between_max_ms``). Every measured cycle must be
one the optimizer planned with every reading believed, or the bench fails.

The site is measured as it runs in the field: its forecaster has learned a week of the site's
own net load (:func:`_week_learned`). ``cycle.*.4dev.first_day`` is the same site on its first
day, before any time-of-day bin is learned: every bin then falls back to the latest
observation, so each cycle moves the whole horizon's forecast and the solver needs more
iterations.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from zoneinfo import ZoneInfo

from benchmarks import Result
from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import Settings
from essd.config_loading import load_settings
from essd.cycle import Controller
from essd.daemon import build_controller, settle_heap
from essd.domain import FallbackRung
from essd.events import CycleCompleted, EventBus
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries, default_series_path
from tests.support.net import free_port
from tests.support.site import EXAMPLE, write_config

WARMUP = 5
START = 1_782_900_000.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _many_devices(n_batteries: int) -> Settings:
    base = load_settings(EXAMPLE)
    devices = [
        {
            "id": f"home-{i:03d}",
            "profile": "household-hybrid-forcible",
            # One port each, as 100 units on a gateway's LAN would have; hil_sim picks free ones.
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 20_000 + i, "unit": 1},
        }
        for i in range(n_batteries)
    ]
    devices.append(
        {
            "id": "meter",
            "profile": "site-meter",
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1, "unit": 1},
        }
    )
    data = base.model_dump(mode="python", exclude_none=True)
    data["devices"] = devices
    data["site"]["grid_import_limit_w"] = 600_000
    # 99 units of one model: the LP plans them as one battery (essd.dispatch.aggregate).
    data["control"]["aggregate_identical_units"] = True
    return Settings(**data)


def _serve(settings_json: str, conn: Connection) -> None:
    """Child process: hil_sim serves the site's devices on a stepped clock that the parent sets
    to its own time before every cycle (the devices then integrate each cycle's period, and the
    controller's freshness and frozen-reading checks see time pass as on a site), until the
    parent says stop."""

    async def main() -> None:
        settings = Settings.model_validate_json(settings_json)
        clock = SimClock(START)
        done = asyncio.Event()

        def on_message() -> None:
            message = conn.recv()
            if message == "stop":
                done.set()
                return
            clock.set(float(message))
            conn.send("ok")

        async with SimulatedSite(settings, clock=clock, free_ports=True) as site:
            asyncio.get_running_loop().add_reader(conn.fileno(), on_message)
            conn.send(site.settings.model_dump_json())
            await done.wait()

    asyncio.run(main())


def _week_learned(ctl: Controller, settings: Settings) -> None:
    """What a week on the site leaves the forecaster: the site's net load (the simulator's own
    load less PV, what the meter and the units measure) observed at the middle of every
    15-minute interval of the seven days before the bench's start."""
    series = SiteSeries.load(default_series_path(settings, None), ZoneInfo(settings.site.timezone))
    for k in range(7 * 96):
        t = START - 7 * 86_400.0 + (k + 0.5) * 900.0
        ctl.forecaster.observe(t, series.value("load_w", t) - series.value("pv_w", t))


async def _measure(
    settings: Settings,
    cycles: int,
    phases: dict[str, list[float]] | None = None,
    between: list[float] | None = None,
    *,
    learned: bool = True,
) -> tuple[list[float], list[float]]:
    """Per-cycle wall time with and without the decide phase (s); ``between``: the time the
    work left running between cycles took to complete (s). ``learned``: the forecaster has
    learned a week of the site (else: its first day)."""
    with_solve: list[float] = []
    without: list[float] = []
    between = [] if between is None else between
    phases = {} if phases is None else phases
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(settings.model_dump_json(), child), daemon=True)
    server.start()
    try:
        served = Settings.model_validate_json(parent.recv())
        clock = SimClock(START)
        bus = EventBus()
        pool = EndpointPool(clock=clock)
        ctl = build_controller(served, clock=clock, bus=bus, pool=pool)
        if learned:
            _week_learned(ctl, served)
        try:
            for i in range(WARMUP + cycles):
                event: CycleCompleted = await ctl.run_cycle()
                # Between cycles, outside the measurement, as in the daemon's sleep: the work
                # the cycle left running (the next step's LP solved ahead) completes, and the
                # devices' time follows the clock.
                started = time.perf_counter()
                await ctl.decider.settle()
                between.append(time.perf_counter() - started)
                clock.advance(settings.control.cycle_period_s)
                parent.send(clock.now())
                parent.recv()
                if i == 0:
                    settle_heap()  # as essd run does after its first cycle
                if i >= WARMUP:
                    _check_representative(event)
                    with_solve.append(event.duration_s)
                    without.append(event.duration_s - event.phase_s["decide"])
                    for name, seconds in event.phase_s.items():
                        phases.setdefault(name, []).append(seconds)
        finally:
            await pool.close()
    finally:
        parent.send("stop")
        server.join(10)
    return with_solve, without


def _check_representative(event: CycleCompleted) -> None:
    """A measured cycle is the daemon's normal one: planned by the optimizer, every reading
    believed (a unit idled as frozen or stale would skip its writes and flatter the figure)."""
    if event.plan.rung is not FallbackRung.OPTIMAL:
        raise RuntimeError(f"cycle {event.cycle}: rung {event.plan.rung.name}: {event.plan.reason}")
    report = event.credibility
    doubted = [] if report is None else [u for u, v in report.units.items() if not v.credible]
    if report is not None and not report.meter.plausible:
        doubted.append(f"meter ({report.meter.detail})")
    if doubted:
        raise RuntimeError(f"cycle {event.cycle}: readings not believed: {doubted}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"process {pid} has no VmRSS (it exited)")


def daemon_rss_mb(seconds: float = 30.0) -> tuple[float, float]:
    """Steady-state and peak RSS of a real ``essd run`` (1 s cycles) against ``essd sim``."""
    with tempfile.TemporaryDirectory() as tmp:
        sim = subprocess.Popen(
            [sys.executable, "-m", "essd", "sim", "--site", str(EXAMPLE), "--free-ports"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert sim.stdout is not None
            ports: dict[str, int] = {}
            settings = load_settings(EXAMPLE)
            while len(ports) < len(settings.devices):
                line = sim.stdout.readline()
                m = re.match(r"(\S+) \S+ \S+://127\.0\.0\.1:(\d+) unit=", line)
                if m:
                    ports[m.group(1)] = int(m.group(2))
            devices = [
                d.model_copy(
                    update={"transport": d.transport.model_copy(update={"port": ports[d.id]})}
                )
                for d in settings.devices
            ]
            served = settings.model_copy(update={"devices": tuple(devices)})
            config = write_config(
                served,
                Path(tmp) / "essd.toml",
                control={"cycle_period_s": 1.0, "setpoint_ttl_s": 10.0},
                metrics={"port": free_port()},
            )
            daemon = subprocess.Popen(
                [sys.executable, "-m", "essd", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                samples = []
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    time.sleep(1.0)
                    samples.append(_rss_mb(daemon.pid))
            finally:
                daemon.terminate()
                daemon.wait(20)
        finally:
            sim.terminate()
            sim.wait(20)
    return samples[-1], max(samples)


def run() -> list[Result]:
    """Cycle percentiles for 4 and 100 devices, and resident memory after them."""
    gc.collect()
    example = load_settings(EXAMPLE)
    phases4: dict[str, list[float]] = {}
    between4: list[float] = []
    # 450 cycles of 10 s: 5 of them start a new 15-minute step (1.1 %, as in a day), so the
    # 99th percentile (the 5th slowest) is no luckier than a day's.
    with4, without4 = asyncio.run(_measure(example, 450, phases4, between4))
    first_day, _ = asyncio.run(_measure(example, 450, learned=False))
    phases100: dict[str, list[float]] = {}
    with100, _ = asyncio.run(_measure(_many_devices(99), 40, phases100))
    steady_mb, peak_mb = daemon_rss_mb()
    return [
        Result("cycle.p50_ms.4dev", statistics.median(without4) * 1000, "ms (without solve)"),
        Result("cycle.p99_ms.4dev.without_solve", _percentile(without4, 99) * 1000, "ms"),
        Result("cycle.p50_ms.4dev.with_solve", statistics.median(with4) * 1000, "ms"),
        Result("cycle.p99_ms.4dev", _percentile(with4, 99) * 1000, "ms (with solve)"),
        Result("cycle.max_ms.4dev", max(with4) * 1000, "ms"),
        Result("cycle.p50_ms.4dev.first_day", statistics.median(first_day) * 1000, "ms"),
        Result("cycle.p99_ms.4dev.first_day", _percentile(first_day, 99) * 1000, "ms"),
        Result("cycle.between_max_ms.4dev", max(between4) * 1000, "ms (look-ahead solve)"),
        Result("cycle.p50_ms.100dev", statistics.median(with100) * 1000, "ms (with solve)"),
        Result("cycle.p99_ms.100dev", _percentile(with100, 99) * 1000, "ms (with solve)"),
        Result("cycle.target_ratio.4dev_p99_vs_50ms", _percentile(with4, 99) * 1000 / 50, "x"),
        Result(
            "cycle.target_ratio.100dev_p99_vs_1000ms", _percentile(with100, 99) * 1000 / 1000, "x"
        ),
        Result("daemon.rss_mb", steady_mb, "MB (essd run, after 30 s of 1 s cycles)"),
        Result("daemon.rss_mb.peak", peak_mb, "MB"),
        Result("daemon.target_ratio.rss_vs_250mb", steady_mb / 250, "x"),
        *(
            Result(f"cycle.phase_{stat}_ms.{size}.{name}", fn(v) * 1000, "ms")
            for size, phases in (("4dev", phases4), ("100dev", phases100))
            for name, v in phases.items()
            for stat, fn in (("p50", statistics.median), ("p99", _p99))
        ),
    ]


def _p99(values: list[float]) -> float:
    return _percentile(values, 99)
