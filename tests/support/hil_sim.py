"""Support for hil_sim tests: the example site served by SimulatedSite, drivers talking to it.

Everything is real: the simulator's ModbusServers on loopback sockets, and the daemon's own
drivers (drivers.factory) or a bare drivers.modbus.ModbusEndpoint (a real pymodbus client).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from drivers.base import ProfileDriver
from drivers.factory import EndpointPool
from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile
from essd.clock import Clock
from essd.config import Settings
from essd.config_loading import load_settings
from essd.endpoints import build_driver
from hil_sim.faults import FaultSpec
from hil_sim.runner import SimulatedSite
from hil_sim.site import SiteSeries

EXAMPLE_SITE = Path(__file__).parents[2] / "profiles" / "sites" / "example.toml"

__all__ = [
    "EXAMPLE_SITE",
    "endpoint_for",
    "example_settings",
    "simulated_example",
    "site_drivers",
]


def example_settings() -> Settings:
    """The shipped example site's settings."""
    return load_settings(EXAMPLE_SITE)


@contextlib.asynccontextmanager
async def simulated_example(
    clock: Clock,
    *,
    faults: Sequence[FaultSpec] = (),
    series: SiteSeries | None = None,
    **kwargs: Any,
) -> AsyncIterator[SimulatedSite]:
    """The example site served on free loopback ports."""
    async with SimulatedSite(
        example_settings(), clock=clock, faults=faults, series=series, free_ports=True, **kwargs
    ) as sim:
        yield sim


def endpoint_for(
    sim: SimulatedSite, device_id: str, clock: Clock, timeout_s: float = 0.3
) -> tuple[ModbusEndpoint, int]:
    """A fresh client endpoint (a real pymodbus client) to one device, and its unit id."""
    e = next(x for x in sim.endpoints() if x.device_id == device_id)
    framing = Framing.SOCKET if e.kind == "tcp" else Framing.RTU
    return ModbusEndpoint(
        TcpTarget(e.host, e.port, framing), clock=clock, timeout_s=timeout_s
    ), e.unit


@contextlib.asynccontextmanager
async def site_drivers(sim: SimulatedSite, clock: Clock) -> AsyncIterator[dict[str, ProfileDriver]]:
    """The daemon's drivers for every device of the simulated site, connected."""
    settings = sim.settings
    pool = EndpointPool(clock=clock, timeout_s=0.5)
    drivers = {
        d.id: build_driver(d, resolve_profile(d.profile), clock=clock, pool=pool)
        for d in settings.devices
    }
    try:
        yield drivers
    finally:
        for drv in drivers.values():
            await drv.close()
        await pool.close()
