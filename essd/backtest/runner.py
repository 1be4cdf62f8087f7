"""The replay: a measured history through the real controller on a stepped clock.

The controller (forecasters, optimizer, ladder, guard) runs once per history step, or every
``cycle_s`` seconds within a step when asked, against :mod:`essd.backtest.plant`. It sees only
the past: at each cycle the meter reports the grid of the step that just ended, and the
forecasters learn from what was replayed so far. The history's ``pv_w`` counts as measured PV
(reported by the first storage unit, as a hybrid inverter does). An export limit is held by
curtailing PV, for the run, the baseline and the optimum alike.

Battery W > 0 discharges; grid W > 0 imports.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from drivers.profile_loader import resolve_profile
from essd.backtest.cli import FORECASTERS
from essd.backtest.history import History
from essd.backtest.plant import ReplayBattery, ReplayMeter, is_meter
from essd.backtest.score import Prices, UnitLimits
from essd.clock import SimClock
from essd.config import ForecastConfig, Settings
from essd.cycle import Controller
from essd.devices import ManagedDevice, envelope_for
from essd.events import EventBus
from essd.forecast import Forecaster, tariff_import_price

__all__ = ["FORECASTERS", "Replay", "replay"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass
class Replay:
    """What the replay produced, one entry per history step."""

    history: History
    settings: Settings
    units: list[UnitLimits]
    grid_w: FloatArray
    baseline_w: FloatArray
    power_w: dict[str, FloatArray]
    soc: dict[str, FloatArray]  # at the start of each step, plus one entry after the last
    rung_cycles: npt.NDArray[np.int64]  # (steps, 6): cycles per rung 1..5 (column = rung)
    prices: Prices
    curtailed_w: FloatArray  # PV curtailed to hold the export limit, step average
    wall_s: float = 0.0

    def rungs_in(self, i0: int, i1: int) -> dict[str, int]:
        """Cycles per fallback rung over steps ``i0 .. i1-1`` (rungs with none left out)."""
        counts = self.rung_cycles[i0:i1].sum(axis=0)
        return {str(r): int(counts[r]) for r in range(1, 6) if counts[r]}


def forecast_config(settings: Settings, forecaster: str, history: History) -> ForecastConfig:
    """The forecast section the replay runs with: prices and carbon from the history when it
    has them (tariffs are known ahead); load and PV as ``forecaster`` says."""
    base = settings.forecast
    update: dict[str, object] = {"series_file": history.path}
    if forecaster == "persistence":
        update.update(load="persistence", pv="persistence")
    elif forecaster == "learned":
        pv = "clear-sky" if base.pv_array is not None else "daily-profile"
        update.update(load="week-profile", pv=pv)
    elif forecaster == "true":
        update.update(load="file", pv="file")
    elif base.load == "file" or base.pv == "file":
        # The site's own series file would be a different history: keep its choices but
        # read series from this one.
        pass
    return base.model_copy(update=update)


def _prices(settings: Settings, history: History, tz: ZoneInfo) -> Prices:
    tariff = settings.tariff
    imp = history.column("import_price")
    if imp is None:
        imp = np.array(
            [tariff_import_price(tariff, datetime.fromtimestamp(t, tz)) for t in history.times]
        )
    exp = history.column("export_price")
    if exp is None:
        exp = np.full(history.steps, tariff.export_price_per_kwh)
    carbon = history.column("carbon_g_per_kwh")
    if carbon is None:
        carbon = np.full(history.steps, settings.forecast.carbon_intensity_g_per_kwh)
    return Prices(
        import_price=imp,
        export_price=np.minimum(exp, imp),
        carbon_g_per_kwh=carbon,
        carbon_price_per_kg=tariff.carbon_price_per_kg,
        demand_charge_per_kw=tariff.demand_charge_per_kw,
        billing_window_s=settings.demand_window_s,
    )


def _build(
    settings: Settings, clock: SimClock, bus: EventBus, soc0: float
) -> tuple[list[ManagedDevice], dict[str, ReplayBattery], ReplayMeter]:
    ctl = settings.control
    devices: list[ManagedDevice] = []
    batteries: dict[str, ReplayBattery] = {}
    meter: ReplayMeter | None = None
    for cfg in settings.devices:
        if not cfg.enabled:
            continue
        profile = resolve_profile(cfg.profile, settings.profile_dirs)
        if is_meter(profile):
            if meter is not None:
                continue  # one grid meter is all the controller reads
            meter = ReplayMeter(cfg.id, profile, clock=clock)
            driver: ReplayMeter | ReplayBattery = meter
            env = None
        else:
            env = envelope_for(
                cfg, profile, reserve_soc=ctl.reserve_soc, max_soc=ctl.max_soc, ramp=None
            )
            r = profile.ratings
            battery = ReplayBattery(
                cfg.id,
                profile,
                clock=clock,
                capacity_wh=env.capacity_wh,
                soc=soc0,
                max_charge_w=env.max_charge_w,
                max_discharge_w=env.max_discharge_w,
                charge_efficiency=r.charge_efficiency,
                discharge_efficiency=r.discharge_efficiency,
            )
            batteries[cfg.id] = battery
            driver = battery
        devices.append(
            ManagedDevice(
                config=cfg,
                profile=profile,
                driver=driver,
                envelope=env,
                clock=clock,
                bus=bus,
                ttl_s=ctl.setpoint_ttl_s,
                stale_after_s=3 * ctl.cycle_period_s,
            )
        )
    if meter is None:
        raise ValueError("devices: the site has no grid meter; a backtest needs one")
    if not batteries:
        raise ValueError("devices: the site has no storage unit to dispatch")
    return devices, batteries, meter


def _replay_settings(
    settings: Settings, history: History, forecaster: str, cycle: float
) -> Settings:
    """The site's settings as the replay runs them: one cycle per ``cycle`` seconds."""
    ctl = settings.control.model_copy(
        update={
            "cycle_period_s": cycle,
            "setpoint_ttl_s": max(settings.control.setpoint_ttl_s, 2 * cycle),
            "stale_after_s": 3 * cycle,
        }
    )
    return settings.model_copy(
        update={"control": ctl, "forecast": forecast_config(settings, forecaster, history)}
    )


def _units(controller: Controller) -> list[UnitLimits]:
    """What the perfect-foresight optimum knows of each unit (the same envelope)."""
    envelopes = {d.id: d.envelope for d in controller.batteries if d.envelope is not None}
    return [
        UnitLimits(
            spec=spec,
            max_charge_w=envelopes[spec.id].max_charge_w,
            max_discharge_w=envelopes[spec.id].max_discharge_w,
            reserve_soc=envelopes[spec.id].reserve_soc,
            max_soc=envelopes[spec.id].max_soc,
        )
        for spec in controller.specs
    ]


def replay(
    settings: Settings,
    history: History,
    *,
    forecaster: str = "site",
    cycle_s: float | None = None,
    soc0: float = 0.5,
) -> Replay:
    """Replay ``history`` from its first row; see the module docstring."""
    if forecaster not in FORECASTERS:
        raise ValueError(f"forecaster: one of {', '.join(FORECASTERS)}, got {forecaster!r}")
    step = history.step_s
    cycle = step if cycle_s is None else cycle_s
    if not (0 < cycle <= step) or abs(step / cycle - round(step / cycle)) > 1e-9:
        raise ValueError(f"cycle: must divide the history step ({step:g} s), got {cycle:g} s")
    sub = round(step / cycle)
    settings = _replay_settings(settings, history, forecaster, cycle)
    clock = SimClock(float(history.times[0]))
    bus = EventBus()
    devices, batteries, meter = _build(settings, clock, bus, soc0)
    controller = Controller(
        settings=settings,
        devices=devices,
        forecaster=Forecaster(settings.forecast, settings.tariff, settings.site.timezone),
        clock=clock,
        bus=bus,
    )
    units = _units(controller)
    load = history.columns["load_w"]
    pv = history.columns["pv_w"]
    exp_lim = settings.site.grid_export_limit_w
    first = next(iter(batteries.values()))
    measured_pv = bool(np.any(pv > 0))
    n = history.steps
    grid = np.zeros(n)
    power = {i: np.zeros(n) for i in batteries}
    soc = {i: np.zeros(n + 1) for i in batteries}
    rung_cycles = np.zeros((n, 6), dtype=np.int64)
    curtailed = np.zeros(n)
    meter.grid_w = float(load[0] - pv[0])
    first.pv_w = float(pv[0]) if measured_pv else None

    async def run() -> None:
        for k in range(n):
            for i, b in batteries.items():
                soc[i][k] = b.soc
            sums = dict.fromkeys(batteries, 0.0)
            g_sum = 0.0
            for _ in range(sub):
                event = await controller.run_cycle()
                rung_cycles[k, int(event.plan.rung) if event.plan is not None else 5] += 1
                achieved = {i: b.step(cycle) for i, b in batteries.items()}
                g = float(load[k] - pv[k]) - sum(achieved.values())
                if g < -exp_lim:
                    curtailed[k] += (-exp_lim - g) / sub
                    g = -exp_lim
                meter.grid_w = g
                if measured_pv:
                    first.pv_w = float(pv[k])
                for i, p in achieved.items():
                    sums[i] += p / sub
                g_sum += g / sub
                clock.advance(cycle)
            grid[k] = g_sum
            for i in batteries:
                power[i][k] = sums[i]
        for i, b in batteries.items():
            soc[i][n] = b.soc

    asyncio.run(run())
    baseline = np.maximum(load - pv, -exp_lim)
    return Replay(
        history=history,
        settings=settings,
        units=units,
        grid_w=grid,
        baseline_w=baseline,
        power_w=power,
        soc=soc,
        rung_cycles=rung_cycles,
        prices=_prices(settings, history, ZoneInfo(settings.site.timezone)),
        curtailed_w=curtailed,
    )
