"""Loopback Modbus TCP for the SunSpec tests: the project's own server and endpoint.

``serve_stores`` serves a RegisterStore per unit (a :class:`drivers.sunspec.SunSpecImage`, or
any store) with :class:`drivers.modbus.ModbusServer` on 127.0.0.1 and yields the port;
``loopback`` is the :class:`drivers.modbus.ModbusEndpoint` the driver talks through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from drivers.modbus import Framing, ModbusEndpoint, ModbusServer, TcpTarget
from drivers.registers import RegisterStore
from essd.clock import RealClock


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
