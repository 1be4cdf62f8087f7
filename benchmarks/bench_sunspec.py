"""SunSpec driver figures over real loopback Modbus TCP against its own simulator image.

Discovery (marker + model walk), one full read of the industrial PCS profile, one W setpoint
with its read-back, and the pure decode rate of model 802.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from benchmarks import Result
from drivers.api import ActivePowerControl
from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile
from drivers.sunspec import SunSpecDriver, decode_point, load_model
from essd.clock import RealClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.sunspec_image import build_sunspec_image

_ROUNDS = 200


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def _loopback() -> list[Result]:
    profile = resolve_profile("industrial-sunspec-pcs")
    img = build_sunspec_image(profile)
    img.set_field("soc", 0.5)
    img.set_point("802.V", 800.0)
    out: list[Result] = []
    async with ModbusServer.tcp({1: img}) as server:
        ep = ModbusEndpoint(
            TcpTarget("127.0.0.1", server.port, Framing.SOCKET), clock=RealClock(), timeout_s=1.0
        )
        await ep.connect()
        discovery: list[float] = []
        for _ in range(20):
            driver = SunSpecDriver(
                device_id="pcs", profile=profile, endpoint=ep, unit=1, clock=RealClock()
            )
            t0 = time.perf_counter()
            await driver.connect()
            discovery.append(time.perf_counter() - t0)
        before = ep.stats(1).requests_total
        await driver.read()
        per_read = ep.stats(1).requests_total - before
        reads: list[float] = []
        for _ in range(_ROUNDS):
            t0 = time.perf_counter()
            await driver.read()
            reads.append(time.perf_counter() - t0)
        writes: list[float] = []
        assert driver.capability(ActivePowerControl) is not None
        for i in range(_ROUNDS):
            t0 = time.perf_counter()
            await driver.set_active_power(-1000.0 * (i % 50), duration_s=30)
            writes.append(time.perf_counter() - t0)
        await ep.close()
    out += [
        Result("sunspec.discovery_median", statistics.median(discovery) * 1e3, "ms"),
        Result("sunspec.read_requests", per_read, "requests"),
        Result("sunspec.read_p50", _pct(reads, 0.5) * 1e3, "ms"),
        Result("sunspec.read_p95", _pct(reads, 0.95) * 1e3, "ms"),
        Result("sunspec.set_active_power_readback_p50", _pct(writes, 0.5) * 1e3, "ms"),
        Result("sunspec.set_active_power_readback_p95", _pct(writes, 0.95) * 1e3, "ms"),
    ]
    return out


def _decode_rate() -> Result:
    model = load_model(802)
    points = [p for p in model.fixed.values() if p.type not in ("pad", "string")]
    words = {p.name: [1] * p.size for p in points}
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        for p in points:
            decode_point(p, words[p.name], 0)
        n += len(points)
    return Result("sunspec.decode_points_per_s", n / (time.perf_counter() - t0), "points/s")


def run() -> list[Result]:
    """Measure discovery, read and write latency over loopback, and the decode rate."""
    return [*asyncio.run(_loopback()), _decode_rate()]
