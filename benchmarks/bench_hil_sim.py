"""Simulator figures: whole-site start/stop, a site read through the daemon's drivers, physics.

Figures:
- ``hil.site_start_stop_ms``: median time to build, start and stop the example site's
  SimulatedSite (five devices: physics, register maps, Modbus servers), of 20 runs.
- ``hil.site_read_ms``: median time for the daemon's drivers to read all five devices once
  (concurrently), the simulator publishing fresh readings on every request.
- ``hil.battery_day_ms``: integrating one simulated day of a unit under a changing command
  (lazy integration, 96 commands), median of 20.
- ``hil.proxy_added_latency_ms``: median extra latency of one read through the delaying proxy
  at delay 0 (the cost of having a proxy in front of a device).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from benchmarks import Result
from drivers.factory import EndpointPool
from drivers.modbus import ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile, shipped_profiles_dir
from drivers.registers import Table
from essd.clock import RealClock, SimClock
from essd.config import Settings
from essd.config_loading import load_settings
from essd.endpoints import build_driver
from hil_sim.battery import Battery, BatteryParams
from hil_sim.runner import SimulatedSite

RUNS = 20
READS = 100


def _example() -> Settings:
    return load_settings(shipped_profiles_dir() / "sites" / "example.toml")


async def _start_stop() -> float:
    settings = _example()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        async with SimulatedSite(settings, clock=SimClock(speed=600), free_ports=True):
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


async def _site_read() -> float:
    clock = RealClock()
    async with SimulatedSite(_example(), clock=clock, free_ports=True) as sim:
        pool = EndpointPool(clock=clock)
        drivers = [
            build_driver(d, resolve_profile(d.profile), clock=clock, pool=pool)
            for d in sim.settings.devices
        ]
        await asyncio.gather(*(d.read() for d in drivers))
        times = []
        for _ in range(READS):
            t = time.perf_counter()
            await asyncio.gather(*(d.read() for d in drivers))
            times.append(time.perf_counter() - t)
        await pool.close()
    return statistics.median(times) * 1000.0


def _battery_day() -> float:
    params = BatteryParams(capacity_wh=215_000.0, max_charge_w=100_000.0, max_discharge_w=100_000.0)
    times = []
    for _ in range(RUNS):
        clock = SimClock()
        bat = Battery(params, clock, initial_soc=0.5)
        t = time.perf_counter()
        for k in range(96):
            bat.command(80_000.0 if (k // 12) % 2 else -80_000.0)
            clock.advance(900)
            bat.state()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


async def _proxy_latency() -> float:
    clock = RealClock()
    async with SimulatedSite(_example(), clock=clock, free_ports=True, proxy=True) as sim:
        e = next(x for x in sim.endpoints() if x.device_id == "meter")
        direct_port = sim.server_of("meter").port
        medians = []
        for port in (direct_port, e.port):
            ep = ModbusEndpoint(TcpTarget(e.host, port), clock=clock)
            await ep.read_registers(Table.INPUT, 0x34, 2, e.unit)
            times = []
            for _ in range(READS):
                t = time.perf_counter()
                await ep.read_registers(Table.INPUT, 0x34, 2, e.unit)
                times.append(time.perf_counter() - t)
            await ep.close()
            medians.append(statistics.median(times))
    return (medians[1] - medians[0]) * 1000.0


def run() -> list[Result]:
    """Measure the simulator's figures."""
    return [
        Result("hil.site_start_stop_ms", asyncio.run(_start_stop()), "ms"),
        Result("hil.site_read_ms", asyncio.run(_site_read()), "ms"),
        Result("hil.battery_day_ms", _battery_day(), "ms"),
        Result("hil.proxy_added_latency_ms", asyncio.run(_proxy_latency()), "ms"),
    ]
