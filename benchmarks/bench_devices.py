"""Device layer figures: simulated site start/stop, read and write latency over loopback Modbus.

Figures:
- ``devices.site_start_stop_s``: start and stop five Modbus servers (a site's worth), one run.
- ``devices.<profile>.read_s``: median time of one full ``driver.read()`` (all block reads).
- ``devices.<profile>.requests_per_read``: block reads per ``read()`` after coalescing.
- ``devices.write_readback_s``: median ``set_active_power`` incl. read-back (household A).
"""

from __future__ import annotations

import asyncio
import statistics
import time

from benchmarks import Result
from drivers.api import ActivePowerControl
from drivers.generic import GenericDriver
from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from drivers.profile_loader import list_profiles
from essd.clock import RealClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage

READS = 200


async def _site_start_stop() -> float:
    profiles = [p for p in list_profiles() if p.driver == "generic"]
    servers = [ModbusServer.tcp({1: ProfileImage(profiles[i % len(profiles)])}) for i in range(5)]
    started = time.perf_counter()
    await asyncio.gather(*(s.start() for s in servers))
    await asyncio.gather(*(s.stop() for s in servers))
    return time.perf_counter() - started


async def _profile_figures() -> list[Result]:
    out: list[Result] = []
    clock = RealClock()
    for profile in list_profiles():
        if profile.driver != "generic":
            continue
        framing = Framing.RTU if profile.transport.framing == "rtu" else Framing.SOCKET
        unit = profile.transport.unit
        image = ProfileImage(profile)
        async with ModbusServer.tcp({unit: image}, framing=framing) as srv:
            ep = ModbusEndpoint(TcpTarget("127.0.0.1", srv.port, framing), clock=clock)
            driver = GenericDriver(device_id="bench", profile=profile, endpoint=ep, clock=clock)
            await driver.read()
            times = []
            for _ in range(READS):
                t = time.perf_counter()
                await driver.read()
                times.append(time.perf_counter() - t)
            out.append(Result(f"devices.{profile.name}.read_s", statistics.median(times), "s"))
            out.append(
                Result(
                    f"devices.{profile.name}.requests_per_read",
                    float(len(driver.read_plan)),
                    "requests",
                )
            )
            if driver.capability(ActivePowerControl) is not None and profile.name.endswith(
                "forcible"
            ):
                times = []
                for i in range(READS // 4):
                    t = time.perf_counter()
                    await driver.set_active_power(-1000.0 if i % 2 else 1000.0, duration_s=60)
                    times.append(time.perf_counter() - t)
                out.append(Result("devices.write_readback_s", statistics.median(times), "s"))
            await ep.close()
    return out


async def _all() -> list[Result]:
    results = [Result("devices.site_start_stop_s", await _site_start_stop(), "s")]
    results += await _profile_figures()
    return results


def run() -> list[Result]:
    """Measure the device layer on this machine."""
    return asyncio.run(_all())
