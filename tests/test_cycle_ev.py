"""The cycle with EV chargers: a real Modbus household site, essd's OCPP central system and a
simulated OCPP charge point on loopback; given a session request and prices, these limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.command_handling import handle_command
from essd.config import Settings
from essd.cycle import Controller, Mode
from essd.daemon import build_controller
from essd.events import CycleCompleted, EventBus
from essd.mqtt import build_state_payload
from essd.ocpp import CentralSystem
from hil_sim.chargers import ChargerLink, SimStation, SimVehicle
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage
from tests.test_cycle import settings as household_settings

TZ = ZoneInfo("Asia/Shanghai")
# 10:45 local: peak price (1.20) until 11:15, then the valley (0.30).
START = datetime(2026, 7, 1, 10, 45, tzinfo=TZ).timestamp()


@dataclass
class EvSite:
    controller: Controller
    central: CentralSystem
    station: SimStation
    link: ChargerLink
    clock: SimClock
    meter: ProfileImage

    async def cycle(self) -> CycleCompleted:
        # A live meter moves a little (a frozen one is not credible: the chargers would pause).
        self.meter.set_field("grid_power_w", 1000.0 + self.clock.now() % 7)
        await self.link.meter_values(1)
        event = await self.controller.run_cycle()
        await self.central.drain()
        return event


def _settings(port: int) -> Settings:
    base = household_settings(port).model_dump()
    base["ocpp"] = {"port": 0, "profile_validity_s": 120}
    base["chargers"] = [
        {"id": "wallbox", "rate_unit": "W", "phases": 1, "max_power_w": 7400, "min_power_w": 1400}
    ]
    for d in base["devices"]:
        d["transport"] = {k: v for k, v in d["transport"].items() if v is not None}
    return Settings.model_validate(base)


@pytest.fixture
async def ev_site() -> AsyncIterator[EvSite]:
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", 0.5)
    inverter.set_field("power_w", 0.0)
    meter.set_field("grid_power_w", 1000.0)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        clock = SimClock(START)
        pool = EndpointPool(clock=clock)
        controller = build_controller(
            _settings(server.port), clock=clock, bus=EventBus(), pool=pool
        )
        assert controller.flex is not None
        central = controller.flex.port
        assert isinstance(central, CentralSystem)
        station = SimStation("wallbox", clock, default_limit_w=7400.0, rate_unit="W", phases=1)
        try:
            async with central, ChargerLink(station, f"ws://127.0.0.1:{central.port}") as link:
                await link.boot()
                await link.plug_in(1, SimVehicle(capacity_wh=60_000.0, energy_wh=20_000.0))
                yield EvSite(controller, central, station, link, clock, meter)
        finally:
            await pool.close()


def _request(site: EvSite, payload: dict[str, object]) -> tuple[bool, str]:
    result = handle_command(
        "session", json.dumps(payload).encode(), site.controller, now=site.clock.now()
    )
    return result.ok, result.error


async def test_cycle_waits_for_the_valley_then_charges_by_the_departure(ev_site: EvSite) -> None:
    ok, error = _request(
        ev_site, {"charger": "wallbox", "departure": START + 2.5 * 3600, "energy_wh": 9000}
    )
    assert ok, error
    event = await ev_site.cycle()
    # The cycle's record and the MQTT state say what the chargers were told.
    assert event.charger_limits_w == {"wallbox": 0.0}
    assert build_state_payload("home", event).charger_limits_w == {"wallbox": 0.0}
    assert any(sid.startswith("wallbox/") for sid in event.plan.session_power_w)
    # At the peak price the vehicle waits: the charger is told 0 W (a pause), not its default.
    assert ev_site.controller.flex is not None
    assert ev_site.controller.flex.last_limits_w == {"wallbox": 0.0}
    assert ev_site.station.limit_w(1) == 0.0
    ev_site.clock.set(START + 31 * 60)  # 11:16, the valley
    await ev_site.cycle()
    limit = ev_site.station.limit_w(1)
    assert limit >= 1400.0
    assert limit <= 9000.0 - 1000.0  # within the site's import headroom


async def test_no_credible_meter_pauses_the_chargers(ev_site: EvSite) -> None:
    ev_site.clock.set(START + 31 * 60)  # the valley: the plan wants to charge
    await ev_site.cycle()
    assert ev_site.station.limit_w(1) > 0.0
    ev_site.clock.advance(1800.0)
    await ev_site.link.meter_values(1)
    await ev_site.controller.run_cycle()  # the meter's registers have not moved for 30 min
    await ev_site.central.drain()
    assert ev_site.station.limit_w(1) == 0.0


async def test_unknown_charger_and_standby(ev_site: EvSite) -> None:
    assert _request(ev_site, {"charger": "nowhere", "energy_wh": 1000}) == (
        False,
        "charger: unknown charger 'nowhere'",
    )
    ev_site.clock.set(START + 31 * 60)
    await ev_site.cycle()
    assert ev_site.station.limit_w(1) > 0.0
    ev_site.controller.set_mode(Mode.STANDBY)
    await ev_site.cycle()
    assert ev_site.station.limit_w(1) == 0.0, "standby pauses the chargers"


async def test_a_dead_controller_leaves_the_charger_on_its_default(ev_site: EvSite) -> None:
    _request(ev_site, {"charger": "wallbox", "departure": START + 2.5 * 3600, "energy_wh": 9000})
    await ev_site.cycle()
    assert ev_site.station.limit_w(1) == 0.0
    # No more cycles: the profile runs out after its validity and the charger's own default
    # limit applies again.
    ev_site.clock.advance(121.0)
    assert ev_site.station.limit_w(1) == 7400.0


async def test_learned_departures_are_durable_state(ev_site: EvSite) -> None:
    flex = ev_site.controller.flex
    assert flex is not None
    flex.book.learner.observe("wallbox", START, START + 9 * 3600)
    data = json.loads(json.dumps(ev_site.controller.durable_state()))
    flex.book.learner.dwell_s.clear()
    ev_site.controller.restore(data)
    assert flex.book.learner.predict("wallbox", START + 86400) == 9 * 3600
    data["departures"] = {"wallbox": {"8": "long"}}
    data["mode"] = "manual"
    with pytest.raises(ValueError, match=r"departures\.wallbox\.8"):
        ev_site.controller.restore(data)
    assert ev_site.controller.mode != "manual", "a state that does not fit changes nothing"
