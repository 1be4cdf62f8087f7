"""The site's energy figures in the cycle's record: net load, measured PV, savings, and the
durable per-unit energy counters (restored after a restart, refused when they do not fit)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import Settings
from essd.cycle import Controller
from essd.cycle.energy import battery_power_w, net_load_w, step_cost
from essd.cycle.forecasting import measured_pv
from essd.daemon import build_controller
from essd.domain import BatteryReading, DeviceClass, Quality, Reading, Snapshot
from essd.events import EventBus
from tests.support.mqtt import T0
from tests.test_cycle import Site, site  # noqa: F401 - the fixture is used by name


def _battery(dev: str, power_w: float | None, pv_w: float | None = None) -> BatteryReading:
    power = (
        Reading.good(power_w, "W", 1.0)
        if power_w is not None
        else Reading.bad("W", 1.0, Quality.MISSING, "no answer")
    )
    extras = {} if pv_w is None else {"pv_power_w": Reading.good(pv_w, "W", 1.0)}
    return BatteryReading(
        device_id=dev,
        device_class=DeviceClass.HOUSEHOLD,
        read_at_mono=1.0,
        available=power_w is not None,
        soc=Reading.good(0.5, "ratio", 1.0),
        power_w=power,
        limits=None,
        capacity_wh=10_000.0,
        extras=extras,
    )


def test_net_load_is_grid_plus_battery_plus_measured_pv() -> None:
    snap = Snapshot(
        time=T0,
        mono=1.0,
        batteries={
            "a": _battery("a", 2000.0, pv_w=1500.0),
            "b": _battery("b", -500.0),
            "c": _battery("c", None),  # not answering: left out
        },
        meter=None,
    )
    assert battery_power_w(snap) == 1500.0
    assert measured_pv(snap) == 1500.0
    # grid 1000 W + batteries 1500 W + PV 1500 W = 4000 W consumed.
    assert net_load_w(snap, 1000.0) == 4000.0
    assert net_load_w(snap, None) is None
    no_pv = Snapshot(time=T0, mono=1.0, batteries={"b": _battery("b", -500.0)}, meter=None)
    assert measured_pv(no_pv) is None
    assert net_load_w(no_pv, 1000.0) == 500.0


def test_savings_are_the_cost_with_idle_batteries_minus_the_cost_paid() -> None:
    prices = {
        "import_price": 1.0,
        "export_price": 0.1,
        "carbon_g_per_kwh": 500.0,
        "carbon_price_per_kg": 0.2,
    }
    hour = 3600.0
    # 2 kW imported for an hour: 2 kWh at 1.0 plus 1 kg CO2 at 0.2.
    assert step_cost(2000.0, hour, **prices) == pytest.approx(2.2)
    # Exporting 1 kW for an hour earns 0.1.
    assert step_cost(-1000.0, hour, **prices) == pytest.approx(-0.1)
    # A battery discharging 3 kW turned 2 kW of import into 1 kW of export: saved 2.3.
    grid, battery = -1000.0, 3000.0
    saved = step_cost(grid + battery, hour, **prices) - step_cost(grid, hour, **prices)
    assert saved == pytest.approx(2.3)
    # Charging from the grid costs: negative savings for that hour.
    assert step_cost(1000.0, hour, **prices) - step_cost(3000.0, hour, **prices) < 0


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    settings = Settings(
        site={"id": "s", "timezone": "UTC", "grid_import_limit_w": 9000, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "inv",
                "profile": "household-hybrid-forcible",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1, "unit": 1},
            }
        ],
        metrics={"enabled": False},
    )
    clock = SimClock(T0)
    pool = EndpointPool(clock=clock)
    try:
        yield build_controller(settings, clock=clock, bus=EventBus(), pool=pool)
    finally:
        await pool.close()


async def test_unit_energy_counters_survive_a_restart(controller: Controller) -> None:
    state = controller.durable_state()
    assert state["unit_wh"] == {}
    state["unit_wh"] = {"inv": [1200.0, 800.5]}
    state["totals"]["savings"] = -3.5  # savings may be negative
    controller.restore(state)
    assert controller.durable_state()["unit_wh"] == {"inv": [1200.0, 800.5]}
    assert controller.durable_state()["totals"]["savings"] == -3.5
    # A state written before these counters existed restores with them at 0.
    del state["unit_wh"]
    controller.restore(state)
    assert controller.durable_state()["unit_wh"] == {}


@pytest.mark.parametrize(
    "bad",
    [[1.0], [-1.0, 2.0], ["1", 2.0], [True, 2.0], [float("inf"), 0.0], 5],
)
async def test_bad_unit_energy_is_refused_naming_the_field(
    controller: Controller, bad: object
) -> None:
    state = controller.durable_state()
    state["unit_wh"] = {"inv": bad}
    with pytest.raises(ValueError, match=r"^unit_wh\.inv: "):
        controller.restore(state)
    assert controller.durable_state()["unit_wh"] == {}  # nothing changed


async def test_the_record_adds_up_a_discharging_unit(
    site: Site,  # noqa: F811 - the fixture
) -> None:
    """Given a unit discharging 2 kW and the meter importing 1 kW at the 1.20 peak price for
    ten cycles of 10 s: these figures in the record."""
    site.inverter.set_field("power_w", 2000.0)
    site.meter.set_field("grid_power_w", 1000.0)
    events = [await site.cycle() for _ in range(10)]
    last = events[-1]
    hours = 9 * 10.0 / 3600.0  # the first cycle only starts the integration
    assert last.devices["inv"].discharged_wh == pytest.approx(2000.0 * hours)
    assert last.devices["inv"].charged_wh == 0.0
    assert last.totals.battery_discharged_wh == pytest.approx(last.devices["inv"].discharged_wh)
    # Without the battery the site would have imported 3 kW: it saved 2 kW at 1.20 per kWh.
    assert last.totals.savings == pytest.approx(2.0 * hours * 1.20)
    assert last.totals.cost == pytest.approx(1.0 * hours * 1.20)
    assert last.net_load_w == pytest.approx(3000.0)
    assert last.pv_power_w is None  # this profile measures no PV
    assert last.totals.pv_wh == 0.0
    # The billing peak is the mean import of a finished 15-minute window: none finished yet.
    assert last.billing_peak_w == 0.0
    assert last.forecast is not None
    assert len(last.forecast.load_w) == last.plan.steps
    assert last.forecast.start == pytest.approx(last.plan.created_at, abs=900.0)
    # What the unit stored survives a restart of the controller.
    state = site.controller.durable_state()
    assert state["unit_wh"]["inv"] == [0.0, pytest.approx(2000.0 * hours)]
