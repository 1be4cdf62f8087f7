"""A managed device publishes its driver's wire counters, plus the reads that overran their
whole budget (which no single request sees), over real Modbus TCP behind a delaying proxy."""

from __future__ import annotations

from drivers.generic import GenericDriver
from drivers.modbus import ModbusEndpoint, TcpTarget
from drivers.profile_loader import resolve_profile
from essd.clock import RealClock, SimClock
from essd.config import DeviceConfig, TcpTransport
from essd.devices import ManagedDevice
from essd.events import EventBus
from hil_sim.modbus_server import ModbusServer
from hil_sim.proxy import DelayProxy
from tests.support.devices import sample_image


async def test_a_read_over_its_budget_is_counted_beside_the_wire_counters() -> None:
    profile = resolve_profile("household-hybrid-forcible")  # 6 block reads per read
    unit = profile.transport.unit
    async with (
        ModbusServer.tcp({unit: sample_image(profile)}) as server,
        DelayProxy("127.0.0.1", server.port) as proxy,
    ):
        # A request may take 5 s; the whole read only 4 x poll_timeout_s = 1 s.
        ep = ModbusEndpoint(TcpTarget("127.0.0.1", proxy.port), clock=RealClock(), timeout_s=5.0)
        driver = GenericDriver(device_id="h", profile=profile, endpoint=ep, clock=SimClock())
        config = DeviceConfig(
            id="h",
            profile=profile.name,
            transport=TcpTransport(kind="tcp", host="127.0.0.1", port=proxy.port, unit=unit),
            poll_timeout_s=0.25,
        )
        dev = ManagedDevice(
            config=config,
            profile=profile,
            driver=driver,
            envelope=None,
            clock=SimClock(),
            bus=EventBus(),
            ttl_s=60.0,
            stale_after_s=30.0,
        )
        try:
            assert await dev.read(mode_safe=False) is not None
            assert dev.frozen_counters() == driver.counters()  # nothing of its own to add
            proxy.delay_s = 0.4  # 6 answers at 0.4 s each cannot fit the 1 s budget
            assert await dev.read(mode_safe=False) is None
            counters = dev.frozen_counters()
            assert counters.errors_total.get("read_deadline") == 1
            assert counters.requests_total == driver.counters().requests_total
            assert "read_deadline" not in driver.counters().errors_total
        finally:
            await ep.close()
