"""Cycle-level tests over real loopback Modbus: given these readings and prices, these setpoints.

Each test lays out the shipped household inverter and site meter profiles as register images,
serves them with the real Modbus server, runs one control cycle with real drivers, and reads
back what the cycle wrote to the inverter's registers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.config import Settings
from essd.cycle import Controller, Mode
from essd.daemon import build_controller
from essd.domain import DeviceState, FallbackRung
from essd.events import CycleCompleted, EventBus
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage

TZ = ZoneInfo("Asia/Shanghai")
# 10:45 local: a 30-minute price peak remains, then the valley.
START = datetime(2026, 7, 1, 10, 45, tzinfo=TZ).timestamp()
# The default site.limit_margin_w is 3 % of the larger limit (270 W of 9 kW import); above a
# zero export limit the guard keeps at most 5 % of that limit plus 100 W: 100 W.
MARGIN_W = 100.0


@dataclass
class Site:
    inverter: ProfileImage
    meter: ProfileImage
    controller: Controller
    clock: SimClock
    events: list[CycleCompleted]

    def commanded_w(self) -> float:
        """What the cycle told the inverter, decoded from its registers (battery sign)."""
        mode = self.inverter.value("forcible_charge_discharge").value
        if mode == 1:
            return -float(self.inverter.value("forcible_charge_power").value or 0.0)
        if mode == 2:
            return float(self.inverter.value("forcible_discharge_power").value or 0.0)
        return 0.0

    async def cycle(self) -> CycleCompleted:
        event = await self.controller.run_cycle()
        self.clock.advance(10.0)
        return event


def settings(port: int, **control: Any) -> Settings:
    return Settings(
        site={
            "id": "home",
            "timezone": "Asia/Shanghai",
            "grid_import_limit_w": 9000,
            "grid_export_limit_w": 0,
        },
        tariff={
            "currency": "CNY",
            "import_tou": [
                {"start": "00:00", "price_per_kwh": 0.30},
                {"start": "10:00", "price_per_kwh": 1.20},
                {"start": "11:15", "price_per_kwh": 0.30},
            ],
            "export_price_per_kwh": 0.0,
        },
        control={"reserve_soc": 0.1, "max_soc": 0.95, **control},
        devices=[
            {
                "id": "inv",
                "profile": "household-hybrid-forcible",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port, "unit": 1},
            },
            {
                "id": "meter",
                "profile": "site-meter",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port, "unit": 2},
            },
        ],
        metrics={"enabled": False},
    )


@pytest.fixture
async def site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    """The site at ``START`` with the unit at SoC 0.5; ``indirect`` params may set
    ``start`` (epoch s) and ``soc``."""
    given: dict[str, float] = getattr(request, "param", {})
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", given.get("soc", 0.5))
    inverter.set_field("power_w", 0.0)
    meter.set_field("grid_power_w", 3000.0)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        clock = SimClock(given.get("start", START))
        bus = EventBus()
        events: list[CycleCompleted] = []
        bus.subscribe(lambda e: events.append(e) if isinstance(e, CycleCompleted) else None)
        pool = EndpointPool(clock=clock)
        controller = build_controller(settings(server.port), clock=clock, bus=bus, pool=pool)
        try:
            yield Site(inverter, meter, controller, clock, events)
        finally:
            await pool.close()


async def test_peak_price_and_charge_left_discharges_to_cover_the_load(site: Site) -> None:
    event = await site.cycle()
    assert event.plan.rung is FallbackRung.OPTIMAL
    assert site.commanded_w() == pytest.approx(3000.0 - MARGIN_W, rel=0.01)
    assert event.setpoints["inv"].power_w == pytest.approx(3000.0 - MARGIN_W, rel=0.01)


async def test_zero_export_caps_discharge_at_the_measured_load(site: Site) -> None:
    site.meter.set_field("grid_power_w", 1200.0)
    await site.cycle()
    assert 0.0 < site.commanded_w() <= 1200.0 + 1.0


async def test_battery_at_reserve_stays_idle(site: Site) -> None:
    site.inverter.set_field("soc", 0.1)
    await site.cycle()
    assert site.commanded_w() <= 0.0


@pytest.mark.parametrize(
    "site",
    [{"start": datetime(2026, 7, 2, 9, 45, tzinfo=TZ).timestamp(), "soc": 0.1}],
    indirect=True,
)
async def test_valley_price_charges_for_the_next_peak(site: Site) -> None:
    # 09:45: the last valley step before a 75-minute peak that needs more than the battery
    # can store in 15 minutes: charge at the full 5 kW rating now.
    await site.cycle()
    assert site.commanded_w() == pytest.approx(-5000.0, rel=0.01)


async def test_meter_loss_idles_every_battery(site: Site) -> None:
    await site.cycle()
    assert site.commanded_w() > 0
    site.meter.set_raw("total_system_power", float("nan"))  # the meter reports NaN
    event = await site.cycle()
    assert event.grid_power_w is None
    assert event.plan.rung is FallbackRung.SAFE_IDLE
    assert "meter" in event.plan.reason
    assert site.commanded_w() == 0.0
    assert event.setpoints["inv"].power_w == 0.0


async def test_standby_writes_the_devices_safe_mode(site: Site) -> None:
    await site.cycle()
    assert site.commanded_w() > 0
    site.controller.set_mode(Mode.STANDBY)
    event = await site.cycle()
    assert site.inverter.value("forcible_charge_discharge").value == 0
    assert event.device_states["inv"] is DeviceState.SAFE
    assert event.plan.rung is FallbackRung.SAFE_IDLE


async def test_manual_setpoint_is_still_guarded(site: Site) -> None:
    site.controller.set_mode(Mode.MANUAL)
    site.controller.set_manual_setpoint("inv", 4500.0, site.clock.now() + 600)
    await site.cycle()
    # The load is 3000 W and export is forbidden: the guard holds the manual request to 3000,
    # less the margin it keeps inside the limit.
    assert site.commanded_w() == pytest.approx(3000.0 - MARGIN_W, abs=1.0)


async def test_invalid_soc_degrades_the_device_and_writes_safe_mode(site: Site) -> None:
    await site.cycle()
    site.inverter.set_raw("state_of_capacity", 0xFFFF)  # out of the physical range
    event = await site.cycle()
    assert event.device_states["inv"] is DeviceState.DEGRADED
    assert site.inverter.value("forcible_charge_discharge").value == 0


async def test_standby_writes_safe_mode_even_to_an_idle_unit(site: Site) -> None:
    site.inverter.set_field("soc", 0.1)  # at reserve: the plan idles it at 0 W
    await site.cycle()
    assert site.commanded_w() == 0.0
    written: list[tuple[str, ...]] = []
    site.inverter.add_write_listener(written.append)
    site.controller.set_mode(Mode.STANDBY)
    await site.cycle()
    # 0 W is not the device's safe mode: standby writes the profile's safe_mode action.
    assert ("forcible_charge_discharge",) in written
    written.clear()
    await site.cycle()
    assert written == []  # once, not every cycle


@pytest.mark.parametrize("site", [{"start": START - 30.0}], indirect=True)
async def test_the_last_cycle_of_a_step_solves_the_next_step_ahead(site: Site) -> None:
    """Cycles of 10 s from 30 s before a step's end: only the third, the step's last, hands
    the next step's LP to the worker (Dispatcher.prepare), once the cycle is over (its writes
    out and its record published); the boundary cycle after it waits for it on a stepped clock
    and plans on rung 1 from its basis."""
    dispatcher = site.controller.dispatcher
    assert dispatcher is not None
    calls: list[float] = []
    published: list[int] = []  # cycles published when the look-ahead began
    prepare = dispatcher.prepare

    def spy(inputs: Any, *, budget_s: float) -> bool:
        calls.append(inputs.time)
        published.append(len(site.events))
        return prepare(inputs, budget_s=budget_s)

    dispatcher.prepare = spy  # type: ignore[method-assign]

    async def cycle() -> CycleCompleted:
        # The site answers: the unit runs at its command, the meter sees a 3 kW load less it.
        event = await site.cycle()
        site.inverter.set_field("power_w", site.commanded_w())
        site.meter.set_field("grid_power_w", 3000.0 - site.commanded_w())
        return event

    for _ in range(2):
        await cycle()
    assert calls == []
    await cycle()
    await site.controller.decider.settle()
    assert calls == [START]
    assert published == [3]
    hot = dispatcher._model(900.0).hot
    assert hot is not None
    assert hot.last_prepare_s > 0.0
    event = await cycle()  # the first of the next step
    assert event.plan.rung is FallbackRung.OPTIMAL, event.plan.reason
    assert calls == [START]
