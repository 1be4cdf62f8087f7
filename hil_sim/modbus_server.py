"""The Modbus server the simulator (and the tests) serve devices with; the client side is
:mod:`drivers.modbus`. These two are the only modules that import pymodbus (pinned to 3.16.1).

:class:`ModbusServer` serves one :class:`~hil_sim.store.RegisterStore` per unit id over Modbus
TCP, RTU framing over TCP, or RTU on a serial device. Stores answer exceptions with
:class:`~hil_sim.store.RegisterAccessError` and stay silent with
:class:`~hil_sim.store.NoResponse`. For fault injection the server can drop every client
connection and stop or resume listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusBaseServer, ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice

from drivers.modbus import EndpointTarget, Framing, SerialTarget, TcpTarget, quiet_pymodbus_logging
from drivers.registers import Table
from hil_sim.store import NoResponse, RegisterAccessError, RegisterStore

log = logging.getLogger(__name__)

_TABLE_BY_FUNCTION = {3: Table.HOLDING, 6: Table.HOLDING, 16: Table.HOLDING, 4: Table.INPUT}


class _StoreContext:
    """What pymodbus's request handlers call: routes each request to a unit's RegisterStore."""

    def __init__(self, stores: dict[int, RegisterStore]) -> None:
        self.stores = stores

    def device_ids(self) -> list[int]:
        """Units served (pymodbus asks for broadcasts)."""
        return list(self.stores)

    def _store(self, device_id: int) -> RegisterStore:
        store = self.stores.get(device_id)
        if store is None:
            # Nobody answers on a serial bus for an unknown unit; the server is built with
            # ignore_missing_devices, so this becomes silence.
            raise NoSuchIdException(f"no unit {device_id}")
        return store

    async def async_getValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | ExcCodes:
        """Words for a read request, or the exception code to answer with."""
        store = self._store(device_id)
        table = _TABLE_BY_FUNCTION.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            return [int(w) for w in store.read(table, address, count)]
        except RegisterAccessError as exc:
            return ExcCodes(int(exc.code))
        except NoResponse:
            raise NoSuchIdException(f"unit {device_id} does not answer") from None
        except Exception:
            # A bug in a store: answer "device failure" as a real device would, but say why
            # (pymodbus's own log is silenced).
            log.exception("unit %d: read %s %d+%d failed", device_id, table.value, address, count)
            return ExcCodes.DEVICE_FAILURE

    async def async_setValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, values: Sequence[int]
    ) -> ExcCodes | None:
        """Apply a write request; None for success, else the exception code."""
        store = self._store(device_id)
        if _TABLE_BY_FUNCTION.get(func_code) is not Table.HOLDING:
            return ExcCodes.ILLEGAL_FUNCTION
        # A device that takes its settings only by function 16 (Deye, SMA) refuses function 6.
        accepts = getattr(store, "accepts_function", None)
        if accepts is not None and not accepts(func_code, address):
            return ExcCodes.ILLEGAL_FUNCTION
        try:
            store.write(address, [int(v) for v in values])
        except RegisterAccessError as exc:
            return ExcCodes(int(exc.code))
        except NoResponse:
            raise NoSuchIdException(f"unit {device_id} does not answer") from None
        except Exception:
            log.exception("unit %d: write %d+%d failed", device_id, address, len(values))
            return ExcCodes.DEVICE_FAILURE
        return None


def _placeholder() -> SimDevice:
    # pymodbus insists on a datastore at construction; the real one is swapped in right after.
    return SimDevice(0, simdata=SimData(0))


class ModbusServer:
    """Serves one RegisterStore per unit id: Modbus TCP, RTU over TCP, or RTU on a serial path.

    Use :meth:`tcp` or :meth:`serial` to build one; ``async with`` starts and stops it. Stores
    can be added and removed while it runs (:meth:`set_store`, :meth:`remove_store`).
    """

    def __init__(self, stores: Mapping[int, RegisterStore], *, target: EndpointTarget) -> None:
        self._stores: dict[int, RegisterStore] = dict(stores)
        self._target = target
        self._context = _StoreContext(self._stores)
        self._pm: ModbusBaseServer | None = None
        self._listener: asyncio.Server | None = None
        self._port: int | None = target.port if isinstance(target, TcpTarget) else None
        quiet_pymodbus_logging()

    @classmethod
    def tcp(
        cls,
        stores: Mapping[int, RegisterStore],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        framing: Framing = Framing.SOCKET,
    ) -> ModbusServer:
        """A server on host:port (port 0 picks a free one; see :attr:`port`)."""
        return cls(stores, target=TcpTarget(host, port, Framing(framing)))

    @classmethod
    def serial(
        cls,
        stores: Mapping[int, RegisterStore],
        *,
        path: str,
        baudrate: int = 9600,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: Literal[1, 2] = 1,
        bytesize: Literal[7, 8] = 8,
    ) -> ModbusServer:
        """A Modbus RTU server on a serial device (a pty end in tests)."""
        return cls(stores, target=SerialTarget(path, baudrate, parity, stopbits, bytesize))

    # -- stores --------------------------------------------------------------------------------

    def set_store(self, unit: int, store: RegisterStore) -> None:
        """Serve ``store`` as ``unit`` (replacing any previous one)."""
        if not 0 <= unit <= 247:
            raise ValueError(f"unit: 0..247, got {unit}")
        self._stores[unit] = store

    def remove_store(self, unit: int) -> None:
        """Stop serving ``unit``: requests to it get no answer."""
        self._stores.pop(unit, None)

    @property
    def units(self) -> tuple[int, ...]:
        """Unit ids being served."""
        return tuple(sorted(self._stores))

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def target(self) -> EndpointTarget:
        """Where the server listens (the TCP port is the bound one once started)."""
        t = self._target
        if isinstance(t, TcpTarget) and self._port is not None:
            return TcpTarget(t.host, self._port, t.framing)
        return t

    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        if self._port is None or self._port == 0:
            raise RuntimeError("port: the server is not a started TCP server")
        return self._port

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._pm is not None

    @property
    def listening(self) -> bool:
        """True while new TCP connections are accepted (serial: while the port is open)."""
        if isinstance(self._target, SerialTarget):
            return self._pm is not None
        return self._listener is not None

    @property
    def connection_count(self) -> int:
        """Client connections currently open (serial: 1 while the port is open)."""
        return 0 if self._pm is None else len(self._pm.active_connections)

    async def start(self) -> None:
        """Start serving (OSError if the address or the device cannot be used)."""
        if self._pm is not None:
            return
        target = self._target
        if isinstance(target, SerialTarget):
            pm: ModbusBaseServer = ModbusSerialServer(
                _placeholder(),
                framer=FramerType.RTU,
                port=target.path,
                baudrate=target.baudrate,
                bytesize=target.bytesize,
                parity=target.parity,
                stopbits=target.stopbits,
                ignore_missing_devices=True,
                reconnect_delay=0,
            )
            pm.context = self._context  # type: ignore[assignment]
            if not await pm.listen():
                raise OSError(f"cannot open serial device {target.path}")
            self._pm = pm
            return
        framer = FramerType.SOCKET if target.framing is Framing.SOCKET else FramerType.RTU
        pm = ModbusTcpServer(
            _placeholder(),
            framer=framer,
            address=(target.host, self._port or 0),
            ignore_missing_devices=True,
        )
        pm.context = self._context  # type: ignore[assignment]
        self._pm = pm
        try:
            await self._listen()
        except OSError:
            self._pm = None
            raise

    async def _listen(self) -> None:
        # The listening socket is ours, not pymodbus's, so that fault injection can stop and
        # resume listening on the same port without touching the open connections.
        assert self._pm is not None
        assert isinstance(self._target, TcpTarget)
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._pm.handle_new_connection, self._target.host, self._port or 0, reuse_address=True
        )
        sock = self._listener.sockets[0]
        self._port = int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection (the port can be reused at once)."""
        pm, self._pm = self._pm, None
        if pm is None:
            return
        await self.refuse_connections()
        self._drop_all(pm)
        if isinstance(self._target, SerialTarget):
            pm.close()

    async def refuse_connections(self) -> None:
        """Stop listening: new connections are refused, open ones keep working."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    async def accept_connections(self) -> None:
        """Listen again on the same port after :meth:`refuse_connections`."""
        if self._pm is None:
            raise RuntimeError("accept_connections: the server is not running")
        if self._listener is None and isinstance(self._target, TcpTarget):
            await self._listen()

    def drop_connections(self) -> int:
        """Abort every open client connection (like a pulled cable); returns how many."""
        if self._pm is None or isinstance(self._target, SerialTarget):
            return 0
        return self._drop_all(self._pm)

    @staticmethod
    def _drop_all(pm: ModbusBaseServer) -> int:
        handlers = list(pm.active_connections.values())
        for h in handlers:
            transport = h.transport
            if transport is not None and hasattr(transport, "abort"):
                with contextlib.suppress(Exception):
                    transport.abort()
            h.close()
        pm.active_connections.clear()
        return len(handlers)

    async def __aenter__(self) -> ModbusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
