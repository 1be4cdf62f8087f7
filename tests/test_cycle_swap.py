"""The swap station as a site type of the daemon: slot devices (profile ``rack-bms-slot``)
served over real loopback Modbus, the daemon's own controller on a stepped clock, packs that
charge by what the cycle wrote into each slot's charge-limit register, and swaps injected by
a seeded Poisson timeline that takes the best charged pack out and docks a depleted one."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.config import Settings
from essd.config_loading import ConfigError, load_settings
from essd.cycle import Controller, Mode
from essd.daemon import build_controller
from essd.events import CycleCompleted, EventBus
from essd.metrics import MetricsExporter
from essd.sitecheck import validate_site
from essd.swapsite import SwapStation
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage

TZ = ZoneInfo("Asia/Shanghai")
START = datetime(2026, 7, 1, 0, 0, tzinfo=TZ).timestamp()
SLOTS = 8
K = 2
TARGET = 0.9
CAPACITY_WH = 20_000.0
SLOT_MAX_W = 15_000.0
BASE_LOAD_W = 5_000.0
STEP_S = 900.0
SUBSTEPS = 3  # one cycle every 5 minutes
SITE_EXAMPLE = Path(__file__).parents[1] / "profiles" / "sites" / "swap-station.toml"


def true_rate(hour_of_day: int) -> float:
    """Swaps per hour: a taxi fleet's day (local time)."""
    return 2.0 if 7 <= hour_of_day < 23 else 0.25


def site_dict(port: int, **swap: Any) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [
        {
            "id": f"slot{i}",
            "profile": "rack-bms-slot",
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port, "unit": i},
            "capacity_wh": CAPACITY_WH,
            "max_charge_w": SLOT_MAX_W,
            "max_soc": 1.0,
        }
        for i in range(1, SLOTS + 1)
    ]
    devices.append(
        {
            "id": "meter",
            "profile": "site-meter",
            "transport": {"kind": "tcp", "host": "127.0.0.1", "port": port, "unit": 100},
        }
    )
    return {
        "site": {
            "id": "swap",
            "timezone": "Asia/Shanghai",
            "grid_import_limit_w": 80_000,
            "grid_export_limit_w": 0,
        },
        "tariff": {
            "currency": "CNY",
            "import_tou": [
                {"start": "00:00", "price_per_kwh": 0.31},
                {"start": "08:00", "price_per_kwh": 1.05},
                {"start": "22:00", "price_per_kwh": 0.31},
            ],
            "export_price_per_kwh": 0.0,
        },
        "control": {
            "cycle_period_s": STEP_S / SUBSTEPS,
            "setpoint_ttl_s": 2 * STEP_S,
            "reserve_soc": 0.0,
            "max_soc": 1.0,
        },
        "devices": devices,
        "swap_station": {
            "slots": [f"slot{i}" for i in range(1, SLOTS + 1)],
            "service_level": K,
            "target_soc": TARGET,
            "arrival_soc": 0.2,
            "demand_weight": 0.5,
            **swap,
        },
    }


@dataclass
class SwapSite:
    controller: Controller
    clock: SimClock
    slots: list[ProfileImage]
    meter: ProfileImage
    rng: np.random.Generator
    swaps: int = 0
    missed: int = 0
    events: list[CycleCompleted] = field(default_factory=list)

    @property
    def station(self) -> SwapStation:
        assert isinstance(self.controller.flex, SwapStation)
        return self.controller.flex

    def charge_w(self, slot: ProfileImage) -> float:
        """What the cycle allows the slot now (its charge-limit register, W)."""
        return float(slot.get_field("charge_limit_w") or 0.0)

    def physics(self, dt: float) -> None:
        """Charge each pack by its slot's limit for ``dt`` s; the meter sees the total."""
        total = BASE_LOAD_W + 500.0 * math.sin(self.clock.now() / 3000.0)
        for slot in self.slots:
            soc = float(slot.get_field("soc") or 0.0)
            p = min(self.charge_w(slot), SLOT_MAX_W) if soc < 1.0 else 0.0
            soc = min(soc + p * dt / 3600.0 * 0.95 / CAPACITY_WH, 1.0)
            slot.set_field("soc", round(soc, 3))
            slot.set_field("power_w", -p)
            total += p
        self.meter.set_field("grid_power_w", total)

    def swap_arrivals(self, t0: float, dt: float) -> None:
        """Poisson arrivals in [t0, t0 + dt): each takes the best charged pack out."""
        hour = datetime.fromtimestamp(t0, TZ).hour
        for _ in range(int(self.rng.poisson(true_rate(hour) * dt / 3600.0))):
            socs = [float(s.get_field("soc") or 0.0) for s in self.slots]
            best = int(np.argmax(socs))
            if socs[best] < TARGET:
                self.missed += 1
                continue
            self.slots[best].set_field("soc", round(float(self.rng.uniform(0.15, 0.25)), 3))
            self.swaps += 1

    async def run(self, cycles: int) -> None:
        dt = STEP_S / SUBSTEPS
        for _ in range(cycles):
            self.swap_arrivals(self.clock.now(), dt)
            self.physics(1.0)  # the meter moves with the new state before the read
            event = await self.controller.run_cycle()
            self.events.append(event)
            self.physics(dt)
            self.clock.advance(dt)


@pytest.fixture
async def swap_site() -> AsyncIterator[SwapSite]:
    profile = resolve_profile("rack-bms-slot")
    slots = [ProfileImage(profile) for _ in range(SLOTS)]
    for s in slots:
        s.set_field("soc", 0.95)
        s.set_field("pack_present", 1)
    meter = ProfileImage(resolve_profile("site-meter"))
    meter.set_field("grid_power_w", BASE_LOAD_W)
    units = {i + 1: s for i, s in enumerate(slots)} | {100: meter}
    async with ModbusServer.tcp(units) as server:
        clock = SimClock(START)
        pool = EndpointPool(clock=clock)
        settings = Settings.model_validate(site_dict(server.port))
        controller = build_controller(settings, clock=clock, bus=EventBus(), pool=pool)
        try:
            yield SwapSite(controller, clock, slots, meter, np.random.default_rng(7))
        finally:
            await pool.close()


def band_means(station: SwapStation) -> tuple[float, float]:
    """The learned mean swaps per hour over the busy hours and over the quiet hours (means
    over the band: one hour's count is one Poisson draw a day)."""
    busy, quiet = [], []
    for h_utc in range(24):
        local = datetime.fromtimestamp(h_utc * 3600, TZ).hour
        learned = station.learner.rate.get(h_utc, station.learner.prior_per_hour)
        (busy if true_rate(local) > 1 else quiet).append(learned)
    return float(np.mean(busy)), float(np.mean(quiet))


async def test_two_days_hold_the_service_level_and_learn_the_demand(swap_site: SwapSite) -> None:
    station = swap_site.station
    assert {d.id for d in swap_site.controller.batteries} == set(), "slots are not batteries"
    assert band_means(station) == (1.0, 1.0), "the prior before any swap"
    await swap_site.run(2 * 24 * SUBSTEPS * 4)
    events = swap_site.events
    assert swap_site.swaps > 50, "the timeline swapped packs"
    assert swap_site.missed == 0
    ready = [e.swap.packs_ready for e in events if e.swap is not None]
    assert len(ready) == len(events)
    assert min(ready) >= K, "k charged packs at every step"
    assert all(e.swap is not None and e.swap.held for e in events)
    # Swaps were seen in the slots' readings (a few may fall between reads of one slot:
    # two swaps of one slot within a cycle are seen once).
    assert station.swaps_total >= 0.9 * swap_site.swaps
    assert station.swaps_total <= swap_site.swaps
    # The learned demand moves from the flat prior (1/h) to the fleet's day: at most 60 % of
    # the prior's error left (the timeline's own counts differ from the rates by chance),
    # and the busy hours learned as busier than the quiet ones.
    busy, quiet = band_means(station)
    assert abs(busy - 2.0) < 0.6 * abs(1.0 - 2.0), busy
    assert abs(quiet - 0.25) < 0.5 * abs(1.0 - 0.25), quiet
    assert busy > 2.5 * quiet
    # Never beyond a slot's limit, and the site import limit held by the plan.
    assert max(max(e.charger_limits_w.values()) for e in events) <= SLOT_MAX_W
    grids = [e.grid_power_w for e in events if e.grid_power_w is not None]
    assert max(grids) <= 80_000.0
    # The plan charged for the day ahead: the quiet night ends with more than k packs ready.
    dawn = [e for e in events if datetime.fromtimestamp(e.time, TZ).hour == 6]
    assert min(e.swap.packs_ready for e in dawn if e.swap) > K
    # Metrics: packs ready vs the service level, rendered by the real exporter.
    exporter = MetricsExporter(clock=swap_site.clock, process_metrics=False)
    bus = EventBus()
    exporter.attach(bus)
    bus.publish(events[-1])
    got = {
        s.name: s.value
        for fam in text_string_to_metric_families(exporter.exposition().decode())
        for s in fam.samples
    }
    last = events[-1].swap
    assert last is not None
    assert got["essd_swap_packs_ready"] == last.packs_ready
    assert got["essd_swap_service_level"] == K
    assert got["essd_swap_events_total"] == station.swaps_total


async def test_learned_demand_is_durable_state(swap_site: SwapSite) -> None:
    station = swap_site.station
    station.learner.rate[3] = 4.5
    data = json.loads(json.dumps(swap_site.controller.durable_state()))
    station.learner.rate.clear()
    swap_site.controller.restore(data)
    assert station.learner.rate[3] == 4.5
    data["swap_demand"] = {"rate": {"25": 1.0}}
    data["mode"] = "manual"
    with pytest.raises(ValueError, match=r"swap_demand\.rate\.25"):
        swap_site.controller.restore(data)
    assert swap_site.controller.mode != "manual", "a state that does not fit changes nothing"


async def test_standby_and_a_frozen_meter_pause_the_slots(swap_site: SwapSite) -> None:
    for s in swap_site.slots:
        s.set_field("soc", 0.3)  # every pack wants charge now (k are due at once)
    await swap_site.run(1)
    assert sum(swap_site.charge_w(s) for s in swap_site.slots) > 0
    swap_site.controller.set_mode(Mode.STANDBY)
    await swap_site.run(1)
    assert all(swap_site.charge_w(s) == 0.0 for s in swap_site.slots), "standby: safe mode"
    swap_site.controller.set_mode(Mode.AUTO)
    await swap_site.run(1)
    assert sum(swap_site.charge_w(s) for s in swap_site.slots) > 0
    # A meter whose registers stop moving is not credible: the slots pause.
    for _ in range(8):
        event = await swap_site.controller.run_cycle()
        swap_site.clock.advance(STEP_S / SUBSTEPS)
    assert event.grid_power_w is None
    assert all(swap_site.charge_w(s) == 0.0 for s in swap_site.slots)


async def test_a_pack_taken_out_is_a_swap_and_its_empty_slot_rests(swap_site: SwapSite) -> None:
    await swap_site.run(1)
    station = swap_site.station
    assert station.swaps_total == 0
    out = swap_site.slots[0]
    out.set_field("pack_present", 0)  # the charged pack leaves; the slot reads nothing useful
    out.set_field("soc", 0.0)
    event = await swap_site.controller.run_cycle()
    assert station.swaps_total == 1
    assert event.swap is not None
    assert (event.swap.packs, event.swap.packs_ready) == (SLOTS - 1, SLOTS - 1)
    assert event.charger_limits_w["slot1"] == 0.0
    assert swap_site.charge_w(out) == 0.0, "no pack: no charging"
    swap_site.clock.advance(STEP_S / SUBSTEPS)
    out.set_field("soc", 0.2)  # a depleted pack docks: the same swap, not a second one
    out.set_field("pack_present", 1)
    swap_site.physics(1.0)
    event = await swap_site.controller.run_cycle()
    assert station.swaps_total == 1
    assert event.swap is not None
    assert (event.swap.packs, event.swap.packs_ready) == (SLOTS, SLOTS - 1)


async def test_a_stationary_battery_is_planned_beside_the_packs() -> None:
    """A site battery (the household archetype) and the slots: the battery stays a battery,
    the slots stay packs, and one plan gives both their commands."""
    slots = [ProfileImage(resolve_profile("rack-bms-slot")) for _ in range(SLOTS)]
    for s in slots:
        s.set_field("soc", 0.3)  # every pack below target: k are due now
        s.set_field("pack_present", 1)
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    inverter.set_field("soc", 0.5)
    inverter.set_field("power_w", 0.0)
    meter = ProfileImage(resolve_profile("site-meter"))
    meter.set_field("grid_power_w", BASE_LOAD_W)
    units = {i + 1: s for i, s in enumerate(slots)} | {50: inverter, 100: meter}
    async with ModbusServer.tcp(units) as server:
        data = site_dict(server.port)
        data["devices"].append(
            {
                "id": "inv",
                "profile": "household-hybrid-forcible",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": server.port, "unit": 50},
            }
        )
        clock = SimClock(START + 0.5 * 3600)  # 00:30, the cheap night
        pool = EndpointPool(clock=clock)
        try:
            controller = build_controller(
                Settings.model_validate(data), clock=clock, bus=EventBus(), pool=pool
            )
            assert [d.id for d in controller.batteries] == ["inv"]
            event = await controller.run_cycle()
        finally:
            await pool.close()
    assert set(event.plan.device_ids) == {"inv"}
    assert set(event.devices) == {"inv"}, "the slots are not battery records"
    assert any(sid.startswith("pack:") for sid in event.plan.session_power_w)
    assert event.swap is not None
    assert event.swap.packs_ready == 0
    limits = [float(s.get_field("charge_limit_w") or 0.0) for s in slots]
    assert sum(limits) > 0, "the due packs charge"
    assert max(limits) <= SLOT_MAX_W
    assert "inv" in event.setpoints
    # What the slots and the battery were told, with the rest of the site, fits the limit.
    battery_charge = max(-event.setpoints["inv"].power_w, 0.0)
    assert sum(limits) + battery_charge + BASE_LOAD_W <= 80_000.0
    # The plan keeps the site within its import limit with both the battery and the packs.
    assert event.plan.grid_w[0] <= 80_000.0 + 1e-6


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("swap", "message"),
    [
        ({"slots": ["slot1", "nowhere"]}, "swap_station.slots.1: no device with id 'nowhere'"),
        ({"service_level": 9}, "service_level: 9 charged packs cannot be kept in 8 slots"),
        ({"slots": ["slot1", "slot1"]}, "slots: device 'slot1' listed twice"),
        ({"arrival_soc": 0.95}, "arrival_soc: must be below target_soc"),
        ({"demand": "series"}, "demand_series_file: required when demand is 'series'"),
        ({"service_level": -1}, "service_level"),
    ],
)
def test_bad_swap_station_config_is_refused(swap: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        Settings.model_validate(site_dict(1502, **swap))


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    text = SITE_EXAMPLE.read_text(encoding="utf-8").replace(
        "service_level = 3", "service_level = 99"
    )
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert "swap_station" in str(err.value)


def test_the_example_swap_site_checks_clean() -> None:
    settings = load_settings(SITE_EXAMPLE)
    assert settings.swap_station is not None
    check = validate_site(settings, str(SITE_EXAMPLE))
    assert check.problems == ()


def test_sitecheck_refuses_slots_it_cannot_charge(tmp_path: Path) -> None:
    data = site_dict(1502, target_soc=0.97)
    data["devices"][0]["profile"] = "site-meter"
    data["devices"][1]["max_soc"] = 0.95
    series = tmp_path / "swaps.csv"
    series.write_text("time,swaps_per_hour\n2026-07-01T00:00,1\n2026-07-01T01:00,-2\n")
    data["swap_station"] |= {"demand": "series", "demand_series_file": str(series)}
    problems = "\n".join(validate_site(Settings.model_validate(data), "site.toml").problems)
    assert "site.toml: swap_station.slots.0: 'slot1' (profile site-meter) takes no charge" in (
        problems
    )
    assert "swap_station.target_soc: 0.97 is above the max SoC 0.95 of slot 'slot2'" in problems
    assert f"swap_station.demand_series_file: {series}: line 3: swaps_per_hour" in problems


async def test_a_series_gives_the_swap_forecast(tmp_path: Path) -> None:
    series = tmp_path / "swaps.csv"
    series.write_text("time,swaps_per_hour\n2026-07-01T00:00,1\n2026-07-01T08:00,6\n")
    data = site_dict(1502, demand="series", demand_series_file=str(series))
    settings = Settings.model_validate(data)
    clock = SimClock(START)
    pool = EndpointPool(clock=clock)
    try:
        controller = build_controller(settings, clock=clock, bus=EventBus(), pool=pool)
        station = controller.flex
        assert isinstance(station, SwapStation)
        per_step = station.demand(START + 7.5 * 3600, 4)
        assert per_step == pytest.approx([0.25, 0.25, 1.5, 1.5])  # 1/h, then 6/h from 08:00
    finally:
        await pool.close()
