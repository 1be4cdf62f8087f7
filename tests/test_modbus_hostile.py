"""Malformed Modbus frames, both ways, over real loopback sockets.

A hostile or broken client sends the simulator truncated, inconsistent and unsupported
frames; a broken device answers essd's client with garbage. Either way every request ends in
an answer, an exception response or a clean timeout, and nothing is logged at ERROR (a log
line per malformed frame would flood the journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import pytest

from drivers.api import DeviceError
from drivers.modbus import Framing, ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile
from drivers.registers import Table
from essd.clock import RealClock
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage


def _mbap(pdu: bytes, *, unit: int = 1, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", 1, 0, len(pdu) + 1 if length is None else length, unit) + pdu


HOSTILE = {
    "fc16 byte count beyond the data": _mbap(b"\x10\x00\x00\x00\x02\x08\x00\x01"),
    "fc16 count and byte count disagree": _mbap(b"\x10\x00\x00\x00\x7f\x02\x00\x01"),
    "fc6 truncated": _mbap(b"\x06\x00"),
    "fc3 zero registers": _mbap(b"\x03\x00\x00\x00\x00"),
    "fc3 2000 registers": _mbap(b"\x03\x00\x00\x07\xd0"),
    "fc23 read/write": _mbap(b"\x17\x00\x00\x00\x01\x00\x00\x00\x01\x02\x00\x00"),
    "header length beyond the frame": _mbap(b"\x03\x00\x00\x00\x01", length=200),
    "broadcast unit": _mbap(b"\x03\x00\x00\x00\x01", unit=0),
    "empty pdu": _mbap(b""),
    "not modbus at all": b"\xff" * 40,
}


@pytest.mark.parametrize("framing", [Framing.SOCKET, Framing.RTU])
async def test_the_simulator_survives_malformed_frames_quietly(
    framing: Framing, caplog: pytest.LogCaptureFixture
) -> None:
    image = ProfileImage(resolve_profile("household-hybrid-forcible"))
    async with ModbusServer.tcp({1: image}, framing=framing) as server:
        with caplog.at_level(logging.DEBUG):
            for frame in HOSTILE.values():
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(frame)
                await writer.drain()
                with contextlib.suppress(TimeoutError):  # no answer is fine for garbage
                    await asyncio.wait_for(reader.read(300), 0.3)
                writer.close()
                await writer.wait_closed()
            # The server still serves a well-formed client afterwards.
            ep = ModbusEndpoint(
                TcpTarget("127.0.0.1", server.port, framing), clock=RealClock(), timeout_s=1.0
            )
            try:
                spec = image.spec("state_of_capacity")
                assert await ep.read_registers(Table.HOLDING, spec.address, 1, 1)
            finally:
                await ep.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def _garbage_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(260):
            # The request's transaction id, then a frame that ends before its exception code,
            # then bytes that belong to no request.
            writer.write(data[:2] + b"\x00\x00\x00\x03\x01\x83" + b"\xff\xff\x00\x00\x00\x02\x01")
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("framing", [Framing.SOCKET, Framing.RTU])
async def test_a_device_answering_garbage_is_an_error_not_a_crash(
    framing: Framing, caplog: pytest.LogCaptureFixture
) -> None:
    server = await asyncio.start_server(_garbage_device, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ep = ModbusEndpoint(TcpTarget("127.0.0.1", port, framing), clock=RealClock(), timeout_s=0.3)
    try:
        with caplog.at_level(logging.DEBUG):
            for _ in range(5):
                with pytest.raises(DeviceError):
                    await ep.read_registers(Table.HOLDING, 0, 2, 1)
    finally:
        await ep.close()
        server.close()
        await server.wait_closed()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
