"""The Modbus transport over real sockets: exceptions, silence, back-off, no overlap, no retry.

Some tests use a small hand-written Modbus TCP responder (a real socket server speaking MBAP) so
that they can hold answers back, answer late or count frames: things a well-behaved server does
not do. The client under test is always the real ModbusEndpoint.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from drivers.api import CommunicationError, DeviceExceptionResponse
from drivers.modbus import ErrorKind, Framing, ModbusEndpoint, SerialTarget, TcpTarget
from drivers.registers import Table
from essd.clock import Backoff, RealClock, SimClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.store import ModbusExceptionCode, NoResponse, RegisterAccessError, RegisterImage


def _image() -> RegisterImage:
    img = RegisterImage()
    img.define(Table.HOLDING, 100, 10)
    img.define(Table.INPUT, 0, 4)
    img.set(Table.HOLDING, 100, list(range(1, 11)))
    img.set(Table.INPUT, 0, [40, 41, 42, 43])
    return img


class Refusing:
    """A store that answers every request with one exception code."""

    def __init__(self, code: ModbusExceptionCode) -> None:
        self.code = code

    def read(self, table: Table, address: int, count: int) -> list[int]:
        raise RegisterAccessError(self.code)

    def write(self, address: int, values: Sequence[int]) -> None:
        raise RegisterAccessError(self.code)


class Silent:
    """An unplugged unit: the server sends nothing."""

    def read(self, table: Table, address: int, count: int) -> list[int]:
        raise NoResponse

    def write(self, address: int, values: Sequence[int]) -> None:
        raise NoResponse


@pytest.fixture
async def server() -> AsyncIterator[ModbusServer]:
    async with ModbusServer.tcp({1: _image(), 2: Silent()}) as srv:
        yield srv


def _endpoint(srv: ModbusServer, clock: RealClock | SimClock | None = None) -> ModbusEndpoint:
    return ModbusEndpoint(
        TcpTarget("127.0.0.1", srv.port), clock=clock or RealClock(), timeout_s=0.3
    )


async def test_reads_and_writes_both_tables(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        assert await ep.read_registers(Table.HOLDING, 100, 10, 1) == list(range(1, 11))
        assert await ep.read_registers(Table.INPUT, 0, 4, 1) == [40, 41, 42, 43]
        await ep.write_registers(102, [7, 8], 1)  # function 16
        await ep.write_registers(109, [65535], 1)  # function 6
        assert await ep.read_registers(Table.HOLDING, 100, 10, 1) == [
            *[1, 2, 7, 8],
            *[5, 6, 7, 8, 9, 65535],
        ]
        stats = ep.stats(1)
        assert stats.requests_total == 5
        assert stats.writes_total == 2
        assert stats.errors_total == {}
        assert stats.last_latency_s is not None
        assert stats.last_latency_s > 0
    finally:
        await ep.close()


@pytest.mark.parametrize("code", list(ModbusExceptionCode))
async def test_exception_responses_carry_the_code(code: ModbusExceptionCode) -> None:
    async with ModbusServer.tcp({5: Refusing(code)}) as srv:
        ep = _endpoint(srv)
        try:
            with pytest.raises(DeviceExceptionResponse) as info:
                await ep.read_registers(Table.HOLDING, 0, 1, 5)
            assert info.value.code == code.value
            with pytest.raises(DeviceExceptionResponse) as info:
                await ep.write_registers(0, [1, 2], 5)
            assert info.value.code == code.value
            assert ep.stats(5).errors_total == {ErrorKind.EXCEPTION.value: 2}
            assert ep.connected  # an exception answer is an answer: the link is fine
        finally:
            await ep.close()


async def test_undefined_registers_answer_illegal_address(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        with pytest.raises(DeviceExceptionResponse) as info:
            await ep.read_registers(Table.HOLDING, 105, 10, 1)  # runs past 109
        assert info.value.code == ModbusExceptionCode.ILLEGAL_DATA_ADDRESS
        with pytest.raises(DeviceExceptionResponse):
            await ep.write_registers(0, [1], 1)
    finally:
        await ep.close()


async def test_silent_unit_and_unknown_unit_time_out(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        for unit in (2, 99):
            with pytest.raises(CommunicationError, match="no answer"):
                await ep.read_registers(Table.HOLDING, 100, 1, unit)
            # Counted as a timeout (it waited), not a refusal or a connection error.
            assert ep.stats(unit).errors_total == {ErrorKind.TIMEOUT.value: 1}
        # the other units on the same connection still answer
        assert await ep.read_registers(Table.HOLDING, 100, 2, 1) == [1, 2]
    finally:
        await ep.close()


async def test_refused_connection_backs_off_on_the_clock() -> None:
    clock = SimClock()
    async with ModbusServer.tcp({1: _image()}) as srv:
        port = srv.port
        await srv.refuse_connections()
        ep = ModbusEndpoint(
            TcpTarget("127.0.0.1", port),
            clock=clock,
            timeout_s=0.3,
            backoff=Backoff(initial_s=1.0, max_s=4.0),
        )
        try:
            with pytest.raises(CommunicationError, match="cannot connect"):
                await ep.read_registers(Table.HOLDING, 100, 1, 1)
            assert ep.backing_off
            assert ep.reconnect_delay_s == 1.0
            # the device is back, but the endpoint waits out its back-off without trying
            await srv.accept_connections()
            # Fails fast with the back-off's own error, without sleeping or sending anything.
            with pytest.raises(CommunicationError, match="next attempt in"):
                await ep.read_registers(Table.HOLDING, 100, 1, 1)
            assert ep.stats(1).errors_total == {
                ErrorKind.CONNECTION.value: 1,
                ErrorKind.BACKOFF.value: 1,
            }
            assert ep.stats(1).requests_total == 0  # nothing was sent
            clock.advance(1.0)
            assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]
            assert not ep.backing_off
            assert ep.reconnect_delay_s == 0.0
        finally:
            await ep.close()


async def test_back_off_doubles_up_to_its_maximum() -> None:
    clock = SimClock()
    async with ModbusServer.tcp({1: _image()}) as srv:
        await srv.refuse_connections()
        ep = ModbusEndpoint(
            TcpTarget("127.0.0.1", srv.port),
            clock=clock,
            timeout_s=0.3,
            backoff=Backoff(initial_s=0.5, max_s=3.0),
        )
        delays = []
        for _ in range(5):
            with pytest.raises(CommunicationError, match="cannot connect"):
                await ep.connect()
            delays.append(ep.reconnect_delay_s)
            clock.advance(ep.reconnect_delay_s)
        assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
        await ep.close()


async def test_dropped_connection_fails_fast_and_reconnects(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]
        assert server.connection_count == 1
        assert server.drop_connections() == 1
        await asyncio.sleep(0.05)  # the client's transport notices the reset
        assert not ep.connected
        # the next request opens a new connection at once (a drop is not a failed connect)
        assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]
        assert server.connection_count == 1
    finally:
        await ep.close()


async def test_drop_while_a_request_is_in_flight_fails_that_request_fast() -> None:
    async with ModbusServer.tcp({1: Silent()}) as srv:
        ep = ModbusEndpoint(TcpTarget("127.0.0.1", srv.port), clock=RealClock(), timeout_s=2.0)
        try:
            await ep.connect()
            task = asyncio.create_task(ep.read_registers(Table.HOLDING, 0, 1, 1))
            await asyncio.sleep(0.05)
            srv.drop_connections()
            # The loss itself ends the request ("connection lost"), not its 2 s timeout.
            with pytest.raises(CommunicationError, match="connection lost"):
                await task
            assert ep.stats(1).errors_total == {ErrorKind.CONNECTION.value: 1}
        finally:
            await ep.close()


async def test_refusing_keeps_open_connections_and_resumes_on_the_same_port(
    server: ModbusServer,
) -> None:
    ep = _endpoint(server)
    other = _endpoint(server)
    try:
        await ep.connect()
        port = server.port
        await server.refuse_connections()
        assert not server.listening
        assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]  # still served
        with pytest.raises(CommunicationError, match="cannot connect"):
            await other.connect()
        await server.accept_connections()
        assert server.port == port
        await other.close()  # resets its back-off
        await other.connect()
        assert await other.read_registers(Table.HOLDING, 100, 1, 1) == [1]
    finally:
        await ep.close()
        await other.close()


async def test_a_stopped_server_frees_its_port_at_once() -> None:
    img = _image()
    srv = ModbusServer.tcp({1: img})
    await srv.start()
    port = srv.port
    ep = _endpoint(srv)
    assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]
    await srv.stop()
    assert not srv.running
    again = ModbusServer.tcp({1: img}, port=port)
    async with again:
        await ep.close()
        assert await ep.read_registers(Table.HOLDING, 100, 1, 1) == [1]
        await ep.close()


async def test_stores_can_be_added_and_removed_while_serving(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        img = RegisterImage()
        img.define(Table.HOLDING, 0, 1, fill=77)
        server.set_store(9, img)
        assert await ep.read_registers(Table.HOLDING, 0, 1, 9) == [77]
        server.remove_store(9)
        with pytest.raises(CommunicationError):
            await ep.read_registers(Table.HOLDING, 0, 1, 9)
        assert 9 not in server.units
    finally:
        await ep.close()


async def test_rtu_framing_over_tcp() -> None:
    async with ModbusServer.tcp({3: _image(), 4: Silent()}, framing=Framing.RTU) as srv:
        ep = ModbusEndpoint(
            TcpTarget("127.0.0.1", srv.port, Framing.RTU), clock=RealClock(), timeout_s=0.3
        )
        try:
            assert await ep.read_registers(Table.HOLDING, 100, 3, 3) == [1, 2, 3]
            await ep.write_registers(100, [9, 9], 3)
            assert await ep.read_registers(Table.HOLDING, 100, 3, 3) == [9, 9, 3]
            with pytest.raises(CommunicationError):
                await ep.read_registers(Table.HOLDING, 100, 1, 4)
            # after a timeout an RTU link is reopened, so a late frame cannot be mistaken
            assert not ep.connected
            assert await ep.read_registers(Table.INPUT, 0, 2, 3) == [40, 41]
        finally:
            await ep.close()


# -- a hand-written Modbus TCP responder -----------------------------------------------------


@dataclass
class Responder:
    """A raw MBAP server: answers function 3 with ``unit*1000 + address + i`` after ``delay``.

    Counts frames and the most requests ever outstanding on one connection at once; writes are
    received and counted but never answered.
    """

    delay_s: float = 0.0
    first_delay_s: float | None = None
    frames: int = 0
    writes: int = 0
    outstanding: int = 0
    max_outstanding: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.frames += 1
                if pdu[0] in (6, 16):
                    self.writes += 1
                    continue
                self.outstanding += 1
                self.max_outstanding = max(self.max_outstanding, self.outstanding)
                delay = self.delay_s
                if self.first_delay_s is not None and self.frames == 1:
                    delay = self.first_delay_s
                task = asyncio.create_task(self._answer(writer, tid, unit, pdu, delay))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, tid: int, unit: int, pdu: bytes, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        _fc, address, count = struct.unpack(">BHH", pdu[:5])
        words = [(unit * 1000 + address + i) & 0xFFFF for i in range(count)]
        body = struct.pack(">BB", 3, 2 * count) + b"".join(struct.pack(">H", w) for w in words)
        writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        self.outstanding -= 1
        await writer.drain()


@pytest.fixture
async def responder() -> AsyncIterator[tuple[Responder, int]]:
    r = Responder(delay_s=0.01)
    srv = await asyncio.start_server(r.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield r, port
    finally:
        srv.close()
        for t in list(r.tasks):
            t.cancel()


async def test_requests_to_one_endpoint_never_overlap(responder: tuple[Responder, int]) -> None:
    r, port = responder
    ep = ModbusEndpoint(TcpTarget("127.0.0.1", port), clock=RealClock(), timeout_s=0.5)
    try:
        calls = [ep.read_registers(Table.HOLDING, 10 * i, 2, 1 + i % 3) for i in range(24)]
        results = await asyncio.gather(*calls)
        for i, words in enumerate(results):
            unit = 1 + i % 3
            assert words == [unit * 1000 + 10 * i, unit * 1000 + 10 * i + 1]
        assert r.frames == 24
        assert r.max_outstanding == 1
    finally:
        await ep.close()


async def test_a_write_that_times_out_is_not_sent_again(
    responder: tuple[Responder, int],
) -> None:
    r, port = responder
    ep = ModbusEndpoint(TcpTarget("127.0.0.1", port), clock=RealClock(), timeout_s=0.2)
    try:
        with pytest.raises(CommunicationError, match="no answer"):
            await ep.write_registers(40, [1, 2], 1)
        await asyncio.sleep(0.5)  # longer than any retry would wait
        assert r.writes == 1
        assert ep.stats(1).writes_total == 1
        assert ep.stats(1).errors_total == {ErrorKind.TIMEOUT.value: 1}
    finally:
        await ep.close()


async def test_a_late_answer_is_not_taken_for_the_next_one(
    responder: tuple[Responder, int],
) -> None:
    r, port = responder
    r.first_delay_s = 0.35  # the first answer arrives after its request timed out
    ep = ModbusEndpoint(TcpTarget("127.0.0.1", port), clock=RealClock(), timeout_s=0.2)
    try:
        with pytest.raises(CommunicationError):
            await ep.read_registers(Table.HOLDING, 1, 1, 1)
        # the second request is pending when the first answer finally arrives
        assert await ep.read_registers(Table.HOLDING, 500, 2, 2) == [2500, 2501]
        await asyncio.sleep(0.2)
        assert await ep.read_registers(Table.HOLDING, 7, 1, 3) == [3007]
    finally:
        await ep.close()


def test_targets_name_themselves() -> None:
    assert str(TcpTarget("10.0.0.5", 502)) == "10.0.0.5:502"
    assert str(TcpTarget("gw", 4196, Framing.RTU)) == "gw:4196 (rtu)"
    assert str(SerialTarget("/dev/ttyUSB0", 19200)) == "/dev/ttyUSB0@19200"


async def test_argument_errors_are_refused_before_sending(server: ModbusServer) -> None:
    ep = _endpoint(server)
    try:
        with pytest.raises(ValueError, match="count"):
            await ep.read_registers(Table.HOLDING, 0, 126, 1)
        with pytest.raises(ValueError, match="values"):
            await ep.write_registers(0, [70000], 1)
        with pytest.raises(ValueError, match="values"):
            await ep.write_registers(0, [], 1)
        assert ep.stats(1).requests_total == 0
    finally:
        await ep.close()


class Broken:
    """A store with a bug: the server answers "device failure" instead of crashing."""

    def read(self, table: Table, address: int, count: int) -> list[int]:
        raise ZeroDivisionError

    def write(self, address: int, values: Sequence[int]) -> None:
        raise KeyError(address)


async def test_a_failing_store_answers_device_failure(caplog: pytest.LogCaptureFixture) -> None:
    async with ModbusServer.tcp({1: Broken()}) as srv:
        ep = _endpoint(srv)
        try:
            with pytest.raises(DeviceExceptionResponse) as info:
                await ep.read_registers(Table.HOLDING, 0, 1, 1)
            assert info.value.code == ModbusExceptionCode.SERVER_DEVICE_FAILURE
            with pytest.raises(DeviceExceptionResponse):
                await ep.write_registers(0, [1], 1)
        finally:
            await ep.close()
    assert "ZeroDivisionError" in caplog.text
