"""Loopback Modbus TCP for the SunSpec tests: the project's own server and endpoint.

``serve_stores`` serves a RegisterStore per unit (a :class:`hil_sim.sunspec_image.SunSpecImage`, or
any store) with :class:`hil_sim.modbus_server.ModbusServer` on 127.0.0.1 and yields the port;
``loopback`` is the :class:`drivers.modbus.ModbusEndpoint` the driver talks through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from essd.clock import RealClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.store import RegisterStore


@asynccontextmanager
async def serve_stores(stores: Mapping[int, RegisterStore]) -> AsyncIterator[int]:
    """Serve ``{unit: store}`` on 127.0.0.1 and yield the port."""
    async with ModbusServer.tcp(dict(stores)) as server:
        yield server.port


def loopback(port: int, *, timeout_s: float = 1.0) -> ModbusEndpoint:
    """An endpoint to a server of :func:`serve_stores`."""
    return ModbusEndpoint(
        TcpTarget("127.0.0.1", port, Framing.SOCKET), clock=RealClock(), timeout_s=timeout_s
    )
