"""Modbus transport: the one module that imports pymodbus (pinned to 3.16.1).

pymodbus changes its API most releases, so everything else in essd talks to one small class:

- :class:`ModbusEndpoint` (client side): one connection per TCP host:port or serial path, shared
  by every unit id behind it. Requests to one endpoint never overlap (an ``asyncio.Lock``); each
  has a short timeout; writes are never retried (a retry can apply a write twice); a failed
  connect backs off on the injected :class:`~essd.clock.Clock`, and while backing off a request
  fails at once with :class:`~drivers.api.CommunicationError` instead of waiting. pymodbus
  exceptions are translated here into :mod:`drivers.api` errors and counted per unit.
The server side, which serves the simulator, is :mod:`hil_sim.modbus_server`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import (
    ConnectionException,
    ModbusException,
    ModbusIOException,
)
from pymodbus.pdu import ModbusPDU

from drivers.api import CommunicationError, DeviceExceptionResponse
from drivers.registers import (
    Table,
)
from essd.clock import Backoff, Clock
from essd.counters import DeviceCounters

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.5


def quiet_pymodbus_logging() -> None:
    """Silence pymodbus's own logger unless someone configured it.

    pymodbus logs every timeout at ERROR; an unplugged portable unit would log each cycle. essd
    logs transitions itself (failure once, recovery once), so the library's chatter goes.
    """
    lib = logging.getLogger("pymodbus")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.CRITICAL)


class Framing(StrEnum):
    """How Modbus frames travel over a TCP connection."""

    SOCKET = "socket"  # Modbus TCP (MBAP header, transaction ids)
    RTU = "rtu"  # RTU frames (CRC) over TCP: serial-to-Ethernet gateways


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """A TCP endpoint: a device or a gateway at host:port."""

    host: str
    port: int
    framing: Framing = Framing.SOCKET

    def __str__(self) -> str:
        suffix = "" if self.framing is Framing.SOCKET else " (rtu)"
        return f"{self.host}:{self.port}{suffix}"


@dataclass(frozen=True, slots=True)
class SerialTarget:
    """A serial line with Modbus RTU (RS-485 adapter, or a pty in tests)."""

    path: str
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    def __str__(self) -> str:
        return f"{self.path}@{self.baudrate}"


EndpointTarget = TcpTarget | SerialTarget


class ErrorKind(StrEnum):
    """Kinds of failed requests, as counted per unit."""

    TIMEOUT = "timeout"  # sent, no answer within the timeout
    CONNECTION = "connection"  # cannot connect, or the connection dropped
    BACKOFF = "backoff"  # not sent: the endpoint is waiting before it reconnects
    EXCEPTION = "exception"  # the device answered with a Modbus exception
    PROTOCOL = "protocol"  # garbled or unexpected answer
    READBACK_MISMATCH = "readback_mismatch"  # a write read back as another value


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    writes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0
    last_latency_s: float | None = None

    def error(self, kind: ErrorKind) -> None:
        """Count one failed request of ``kind``."""
        self.errors[kind.value] = self.errors.get(kind.value, 0) + 1

    def freeze(self) -> DeviceCounters:
        """A frozen copy for callers."""
        return DeviceCounters(
            requests_total=self.requests,
            errors_total=dict(self.errors),
            writes_total=self.writes,
            readback_mismatches_total=self.mismatches,
            last_latency_s=self.last_latency_s,
        )


_Client = AsyncModbusTcpClient | AsyncModbusSerialClient


class ModbusEndpoint:
    """One Modbus connection (TCP host:port or serial path) shared by the units behind it.

    Requests are serialised by a lock, so concurrent callers queue instead of interleaving
    frames. Nothing is retried: a failed request raises at once and the caller decides.
    """

    def __init__(
        self,
        target: EndpointTarget,
        *,
        clock: Clock,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff: Backoff | None = None,
        latency_timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        self._target = target
        self._clock = clock
        self._timeout_s = timeout_s
        self._backoff = backoff or Backoff()
        # Latency is a real-time measurement of I/O, not control-path time: a stepped SimClock
        # would report 0 for every request.
        self._timer = latency_timer
        self._lock = asyncio.Lock()
        self._client: _Client | None = None
        self._delay_s = 0.0
        self._failures = 0  # failed connects in a row
        self._retry_at: float | None = None
        self._last_connect_error = ""
        self._counters: dict[int, _Counters] = {}
        quiet_pymodbus_logging()

    # -- state ---------------------------------------------------------------------------------

    @property
    def target(self) -> EndpointTarget:
        """Where this endpoint connects."""
        return self._target

    @property
    def timeout_s(self) -> float:
        """Per-request timeout in seconds."""
        return self._timeout_s

    @property
    def connected(self) -> bool:
        """True while the connection is open."""
        return self._client is not None and self._client.connected

    @property
    def backing_off(self) -> bool:
        """True while a failed connect keeps the endpoint from trying again."""
        return self._retry_at is not None and self._clock.monotonic() < self._retry_at

    @property
    def reconnect_delay_s(self) -> float:
        """The current back-off delay (0 after a successful connect)."""
        return self._delay_s

    def stats(self, unit: int) -> DeviceCounters:
        """Counters of one unit id on this endpoint."""
        return self._unit(unit).freeze()

    def note_readback_mismatch(self, unit: int) -> None:
        """Count a write that read back differently (the driver detects it)."""
        c = self._unit(unit)
        c.mismatches += 1
        c.error(ErrorKind.READBACK_MISMATCH)

    def _unit(self, unit: int) -> _Counters:
        return self._counters.setdefault(unit, _Counters())

    def __str__(self) -> str:
        return f"modbus {self._target}"

    # -- connection ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection now (CommunicationError if it fails or is backing off)."""
        async with self._lock:
            await self._ensure_connected(None)

    async def close(self) -> None:
        """Close the connection; a later request opens it again."""
        async with self._lock:
            self._drop()
            self._retry_at = None
            self._delay_s = 0.0
            self._failures = 0

    def _new_client(self) -> _Client:
        # retries=0: pymodbus would resend a write that timed out; reconnect_delay=0: pymodbus
        # would reconnect on its own timer (real time); the endpoint does it on the Clock.
        common: dict[str, Any] = {
            "timeout": self._timeout_s,
            "retries": 0,
            "reconnect_delay": 0,
        }
        target = self._target
        client: _Client
        if isinstance(target, TcpTarget):
            framer = FramerType.SOCKET if target.framing is Framing.SOCKET else FramerType.RTU
            client = AsyncModbusTcpClient(target.host, port=target.port, framer=framer, **common)
        else:
            client = AsyncModbusSerialClient(
                target.path,
                framer=FramerType.RTU,
                baudrate=target.baudrate,
                bytesize=target.bytesize,
                parity=target.parity,
                stopbits=target.stopbits,
                **common,
            )
        # Bound to this client, so a late notice from an old connection cannot touch a new one.
        client.ctx.trace_connect = functools.partial(_on_connection_change, client)
        return client

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _ensure_connected(self, unit: int | None) -> None:
        if self.connected:
            return
        now = self._clock.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            if unit is not None:
                self._unit(unit).error(ErrorKind.BACKOFF)
            raise CommunicationError(
                f"{self}: not connected, next attempt in {self._retry_at - now:.1f} s "
                f"(last: {self._last_connect_error})"
            )
        self._drop()
        client = self._new_client()
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:  # serial ports raise on open
            ok = False
            self._last_connect_error = str(exc) or type(exc).__name__
        else:
            self._last_connect_error = "connection refused or timed out"
        if not ok:
            client.close()
            if self._delay_s == 0.0:  # log the failure once, not at every retry
                log.warning("%s: cannot connect: %s", self, self._last_connect_error)
            self._failures += 1
            self._delay_s = self._backoff.delay_s(self._failures)
            self._retry_at = self._clock.monotonic() + self._delay_s
            if unit is not None:
                self._unit(unit).error(ErrorKind.CONNECTION)
            raise CommunicationError(
                f"{self}: cannot connect ({self._last_connect_error}); "
                f"next attempt in {self._delay_s:.1f} s"
            )
        if self._delay_s > 0.0:
            log.info("%s: connected again", self)
        self._client = client
        self._delay_s = 0.0
        self._failures = 0
        self._retry_at = None

    # -- requests ------------------------------------------------------------------------------

    async def read_registers(self, table: Table, address: int, count: int, unit: int) -> list[int]:
        """Read ``count`` registers of ``table`` from ``address`` on ``unit``.

        Raises CommunicationError (no usable answer) or DeviceExceptionResponse.
        """
        if not 1 <= count <= 125:
            raise ValueError(f"count: 1..125 registers per read, got {count}")

        async def call(client: _Client) -> ModbusPDU:
            """Function 4 for input registers, 3 for holding registers."""
            if table is Table.INPUT:
                return await client.read_input_registers(address, count=count, device_id=unit)
            return await client.read_holding_registers(address, count=count, device_id=unit)

        pdu = await self._request(unit, f"read {table.value} {address}+{count}", call)
        registers = list(pdu.registers)
        if len(registers) != count:
            self._unit(unit).error(ErrorKind.PROTOCOL)
            raise CommunicationError(
                f"{self} unit {unit}: read {address}+{count} answered {len(registers)} registers"
            )
        return registers

    async def write_registers(
        self,
        address: int,
        values: Sequence[int],
        unit: int,
        *,
        function: Literal[6, 16] | None = None,
    ) -> None:
        """Write holding registers from ``address`` on ``unit`` (never retried).

        By default one register goes as function 6, several as function 16, as most devices
        expect; ``function=16`` forces 16 for one register too (devices that refuse 6).
        """
        words = [int(v) for v in values]
        if not 1 <= len(words) <= 123:
            raise ValueError(f"values: 1..123 registers per write, got {len(words)}")
        if any(not 0 <= w <= 0xFFFF for w in words):
            raise ValueError(f"values: register words must be 0..65535, got {words}")
        if function == 6 and len(words) != 1:
            raise ValueError(f"function 6 writes one register, not {len(words)}")
        single = len(words) == 1 and function != 16

        async def call(client: _Client) -> ModbusPDU:
            """Function 6 for one register (unless 16 is asked for), 16 for several."""
            if single:
                return await client.write_register(address, words[0], device_id=unit)
            return await client.write_registers(address, words, device_id=unit)

        self._unit(unit).writes += 1
        await self._request(unit, f"write {address}+{len(words)}", call)

    async def _request(
        self,
        unit: int,
        what: str,
        call: Callable[[_Client], Any],
    ) -> ModbusPDU:
        counters = self._unit(unit)
        async with self._lock:
            await self._ensure_connected(unit)
            client = self._client
            assert client is not None  # _ensure_connected raised otherwise
            counters.requests += 1
            started = self._timer()
            try:
                # pymodbus applies the timeout itself; the outer one is a safety net only.
                async with asyncio.timeout(2 * self._timeout_s + 1.0):
                    pdu: ModbusPDU = await call(client)
            except (ModbusIOException, TimeoutError) as exc:
                counters.error(ErrorKind.TIMEOUT)
                self._after_timeout()
                raise CommunicationError(f"{self} unit {unit}: {what}: no answer ({exc})") from None
            except ConnectionException as exc:
                counters.error(ErrorKind.CONNECTION)
                self._drop()
                raise CommunicationError(f"{self} unit {unit}: {what}: {exc}") from None
            except ModbusException as exc:
                counters.error(ErrorKind.PROTOCOL)
                self._drop()
                raise CommunicationError(f"{self} unit {unit}: {what}: {exc}") from None
            except asyncio.CancelledError:
                self._after_timeout()  # an answer may still arrive: same care as a timeout
                raise
            finally:
                counters.last_latency_s = self._timer() - started
            if pdu.isError():
                counters.error(ErrorKind.EXCEPTION)
                code = int(pdu.exception_code)
                raise DeviceExceptionResponse(
                    code, f"{self} unit {unit}: {what}: Modbus exception {_exception_name(code)}"
                )
            return pdu

    def _after_timeout(self) -> None:
        # RTU frames carry no transaction id: a late answer would be taken for the answer to the
        # next request. Reopening the connection discards it. Modbus TCP matches transaction ids.
        if isinstance(self._target, SerialTarget) or self._target.framing is Framing.RTU:
            self._drop()


def _on_connection_change(client: _Client, connected: bool) -> None:
    """Fail the request in flight at once when the peer drops the connection.

    Without this, pymodbus would wait out the full timeout for an answer that cannot come.
    """
    if connected:
        return
    future: asyncio.Future[ModbusPDU] | None = getattr(client.ctx, "response_future", None)
    if future is not None and not future.done():
        future.set_exception(ConnectionException("connection lost"))


def _exception_name(code: int) -> str:
    try:
        return f"{code} ({ExcCodes(code).name})"
    except ValueError:
        return str(code)
