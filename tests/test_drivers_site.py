"""The example site's plain devices, built from the site config and read concurrently.

Each device is served by its own ModbusServer (framing as its configured transport says) on a
free loopback port; the drivers come from ``essd.endpoints.build_driver``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from drivers.api import CommunicationError, DeviceDriver
from drivers.factory import EndpointPool
from drivers.modbus import Framing
from drivers.profile_loader import list_profiles, resolve_profile
from essd.clock import RealClock
from essd.config import DeviceConfig, SerialTransport
from essd.config_loading import load_settings
from essd.domain import BatteryReading, MeterReading
from essd.endpoints import build_driver
from hil_sim.modbus_server import ModbusServer
from tests.support.devices import sample_image

EXAMPLE = Path(__file__).parents[1] / "profiles" / "sites" / "example.toml"


async def test_example_site_devices_read_concurrently() -> None:
    settings = load_settings(EXAMPLE)
    plain = {p.name for p in list_profiles() if p.driver == "generic"}
    devices = [d for d in settings.devices if d.profile in plain]  # SunSpec: its own tests
    assert {d.profile for d in devices} >= {
        "household-hybrid-forcible",
        "household-ess-setpoint",
        "portable-power-station",
        "site-meter",
    }
    clock = RealClock()
    pool = EndpointPool(clock=clock)
    async with contextlib.AsyncExitStack() as stack:
        drivers: list[DeviceDriver] = []
        for dev in devices:
            assert not isinstance(dev.transport, SerialTransport)
            profile = resolve_profile(dev.profile)
            framing = Framing.RTU if dev.transport.kind == "rtu-over-tcp" else Framing.SOCKET
            server = await stack.enter_async_context(
                ModbusServer.tcp({dev.transport.unit: sample_image(profile)}, framing=framing)
            )
            local = dev.model_copy(
                update={"transport": dev.transport.model_copy(update={"port": server.port})}
            )
            assert isinstance(local, DeviceConfig)
            drivers.append(build_driver(local, profile, clock=clock, pool=pool))
        try:
            readings = await asyncio.gather(*(d.read() for d in drivers))
            kinds = {type(r) for r in readings}
            assert kinds == {BatteryReading, MeterReading}
            for reading in readings:
                if isinstance(reading, BatteryReading):
                    assert reading.available
                    assert reading.soc.valid
            assert len(pool.endpoints) == len(drivers)
        finally:
            await pool.close()
    # every server is gone: the next read is a communication error, or "unavailable"
    for d in drivers:
        try:
            r = await d.read()
        except CommunicationError:
            continue
        assert isinstance(r, BatteryReading)
        assert not r.available
    await pool.close()
