"""Modbus RTU over a real serial path: a pty pair made by socat, server on one end, driver on
the other (what a USB RS-485 adapter looks like to essd)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from drivers.api import ChargeLimitControl, CommunicationError, OutputControl
from drivers.factory import EndpointPool
from drivers.modbus import ModbusEndpoint, SerialTarget
from drivers.profile_loader import resolve_profile
from drivers.registers import Table
from essd.clock import RealClock
from essd.config import DeviceConfig
from essd.domain import BatteryReading
from essd.endpoints import build_driver
from hil_sim.modbus_server import ModbusServer
from hil_sim.store import NoResponse
from tests.support.devices import pty_pair, sample_image


@pytest.fixture
def ptys() -> Iterator[tuple[str, str]]:
    with pty_pair() as pair:
        yield pair


class Unplugged:
    def read(self, table: Table, address: int, count: int) -> list[int]:
        raise NoResponse

    def write(self, address: int, values: object) -> None:
        raise NoResponse


async def test_portable_unit_over_a_serial_line(ptys: tuple[str, str]) -> None:
    device_end, host_end = ptys
    profile = resolve_profile("portable-power-station")
    image = sample_image(profile)
    image.set_field("soc", 0.42)
    image.set_value("ac_input_power", 300)
    image.set_value("dc_input_power", 0)
    image.set_value("ac_output_power", 120)
    image.set_value("dc_output_power", 30)
    async with ModbusServer.serial({1: image}, path=device_end, baudrate=115200):
        config = DeviceConfig.model_validate(
            {
                "id": "camp1",
                "profile": profile.name,
                "transport": {"kind": "serial", "port": host_end, "baudrate": 115200},
            }
        )
        pool = EndpointPool(clock=RealClock())
        try:
            driver = build_driver(config, profile, clock=RealClock(), pool=pool)
            assert isinstance(pool.endpoints[0].target, SerialTarget)
            reading = await driver.read()
            assert isinstance(reading, BatteryReading)
            assert reading.available
            assert reading.soc.value == pytest.approx(0.42)
            assert reading.power_w.value == pytest.approx(120 + 30 - 300)  # charging 150 W
            assert driver.capability(ChargeLimitControl) is not None
            result = await driver.set_charge_limit(450.0)
            assert result.ok
            assert image.value("ac_charge_power_limit").value == 450.0
            assert driver.capability(OutputControl) is not None
            assert (await driver.set_output(False)).ok
            assert image.value("ac_output_on").value == 0.0
            assert image.value("dc_output_on").value == 0.0
        finally:
            await pool.close()


async def test_unplugged_unit_on_a_serial_line_is_unavailable(ptys: tuple[str, str]) -> None:
    device_end, host_end = ptys
    profile = resolve_profile("portable-power-station")
    image = sample_image(profile)
    async with ModbusServer.serial({1: image}, path=device_end, baudrate=115200) as server:
        config = DeviceConfig.model_validate(
            {
                "id": "camp1",
                "profile": profile.name,
                "transport": {"kind": "serial", "port": host_end, "baudrate": 115200},
                "poll_timeout_s": 0.2,
            }
        )
        pool = EndpointPool(clock=RealClock())
        try:
            driver = build_driver(config, profile, clock=RealClock(), pool=pool)
            first = await driver.read()
            assert isinstance(first, BatteryReading)
            assert first.available
            server.set_store(1, Unplugged())
            reading = await driver.read()
            assert isinstance(reading, BatteryReading)
            assert not reading.available
            assert not reading.soc.valid
            assert "no answer" in reading.soc.reason
            assert reading.limits is not None
            assert reading.limits.max_charge_w == 0.0
            server.set_store(1, image)  # plugged in again
            again = await driver.read()
            assert isinstance(again, BatteryReading)
            assert again.available
        finally:
            await pool.close()


async def test_a_missing_serial_device_is_a_communication_error() -> None:
    ep = ModbusEndpoint(SerialTarget("/dev/essd-no-such-tty"), clock=RealClock(), timeout_s=0.2)
    with pytest.raises(CommunicationError, match="cannot connect"):
        await ep.read_registers(Table.HOLDING, 0, 1, 1)
    await ep.close()


async def test_serial_server_restarts_on_the_same_device(ptys: tuple[str, str]) -> None:
    device_end, host_end = ptys
    image = sample_image(resolve_profile("portable-power-station"))
    server = ModbusServer.serial({1: image}, path=device_end, baudrate=115200)
    ep = ModbusEndpoint(SerialTarget(host_end, 115200), clock=RealClock(), timeout_s=0.2)
    try:
        await server.start()
        assert server.listening
        assert await ep.read_registers(Table.HOLDING, 43, 1, 1) == image.read(Table.HOLDING, 43, 1)
        await server.stop()
        assert not server.running
        with pytest.raises(CommunicationError):
            await ep.read_registers(Table.HOLDING, 43, 1, 1)
        await server.start()
        assert await ep.read_registers(Table.HOLDING, 43, 1, 1) == image.read(Table.HOLDING, 43, 1)
    finally:
        await ep.close()
        await server.stop()
