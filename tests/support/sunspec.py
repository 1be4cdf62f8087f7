"""Loopback Modbus TCP for the SunSpec tests, until ``drivers.modbus`` lands on main.

``serve_stores`` serves a RegisterStore per unit with a real pymodbus TCP server on 127.0.0.1;
``LoopbackEndpoint`` is a thin client with the interface the SunSpec driver expects
(``read_registers(table, address, count, unit)`` / ``write_registers(address, values, unit)``),
so switching the tests to ``drivers.modbus.ModbusEndpoint`` is a one-line change.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import ModbusException
from pymodbus.server import ModbusTcpServer

from drivers.api import CommunicationError, DeviceExceptionResponse
from drivers.registers import RegisterAccessError, RegisterStore, Table

_READ = {3: Table.HOLDING, 4: Table.INPUT}


class _StoreContext(ModbusServerContext):
    """Routes each request to the RegisterStore of its unit (no pymodbus datastore)."""

    def __init__(self, stores: Mapping[int, RegisterStore]) -> None:
        # The base constructor builds pymodbus's own datastore; this context replaces it.
        self._stores = dict(stores)
        self.old_simulator = True
        self.simdevices = []
        self.writes = 0

    def device_ids(self) -> list[int]:
        return list(self._stores)

    async def async_getValues(  # noqa: N802 - pymodbus's method name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> Any:
        store = self._stores.get(device_id)
        if store is None or func_code not in _READ:
            return ExcCodes.ILLEGAL_FUNCTION if store else ExcCodes.GATEWAY_NO_RESPONSE
        try:
            return store.read(_READ[func_code], address, count)
        except RegisterAccessError as exc:
            return ExcCodes(int(exc.code))

    async def async_setValues(  # noqa: N802 - pymodbus's method name
        self, device_id: int, func_code: int, address: int, values: Any
    ) -> Any:
        store = self._stores.get(device_id)
        if store is None or func_code not in (6, 16):
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            store.write(address, list(values))
        except RegisterAccessError as exc:
            return ExcCodes(int(exc.code))
        self.writes += 1
        return None


@asynccontextmanager
async def serve_stores(stores: Mapping[int, RegisterStore]) -> AsyncIterator[int]:
    """Serve ``{unit: store}`` on 127.0.0.1 and yield the port."""
    server = ModbusTcpServer(_StoreContext(stores), address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        sockets = cast(Any, server.transport).sockets  # an asyncio.Server once listening
        yield int(sockets[0].getsockname()[1])
    finally:
        await cast(Any, server).shutdown()


class LoopbackEndpoint:
    """A thin pymodbus TCP client with the SunSpec driver's endpoint interface."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> None:
        self._client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)
        self._lock = asyncio.Lock()
        self.requests = 0

    async def connect(self) -> None:
        """Open the connection (idempotent)."""
        if self._client.connected:
            return
        if not await self._client.connect():
            raise CommunicationError("connection refused")

    async def close(self) -> None:
        """Close the connection."""
        self._client.close()

    async def read_registers(self, table: Table, address: int, count: int, unit: int) -> list[int]:
        """Read ``count`` registers."""
        await self.connect()
        async with self._lock:
            self.requests += 1
            try:
                if table is Table.HOLDING:
                    rr = await self._client.read_holding_registers(
                        address, count=count, device_id=unit
                    )
                else:
                    rr = await self._client.read_input_registers(
                        address, count=count, device_id=unit
                    )
            except ModbusException as exc:
                raise CommunicationError(str(exc)) from None
        if rr.isError():
            raise DeviceExceptionResponse(int(rr.exception_code), f"exception at {address}")
        return list(rr.registers)

    async def write_registers(self, address: int, values: Sequence[int], unit: int) -> None:
        """Write holding registers."""
        await self.connect()
        async with self._lock:
            self.requests += 1
            try:
                rr = await self._client.write_registers(address, list(values), device_id=unit)
            except ModbusException as exc:
                raise CommunicationError(str(exc)) from None
        if rr.isError():
            raise DeviceExceptionResponse(int(rr.exception_code), f"exception at {address}")
