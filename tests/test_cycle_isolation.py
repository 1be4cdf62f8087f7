"""Each phase of the cycle fails on its own: an exception or a NaN injected into read,
snapshot, forecast, decide, guard, write and publish still gives a published cycle, a lower
rung with its typed cause, every unit safe, and no exception out of ``run_cycle``.

The site is the household inverter and meter of ``test_cycle`` over real loopback Modbus;
the inverter starts discharging 3,000 W (a peak price and 3 kW of load), so "safe" is visible
in its registers: a failing phase must never leave it at a setpoint nobody checked.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import essd.cycle.guarding
from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.daemon import build_controller
from essd.domain import FallbackRung, MeterReading, PlanCause, Reading
from essd.events import CycleCompleted, Event, EventBus, WriteStatus
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage
from tests.test_cycle import START, Site, settings, site  # noqa: F401 - the fixture by name

Inject = Callable[[Site, pytest.MonkeyPatch], None]


def _raise(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected failure")


async def _raise_async(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected failure")


def read_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    for d in s.controller.devices.values():
        mp.setattr(d, "read", _raise_async)
    # Failing long enough that the last good readings are stale (3 cycle periods).
    s.clock.advance(30.0)


def meter_reads_nan(s: Site, mp: pytest.MonkeyPatch) -> None:
    meter = s.controller.meter
    assert meter is not None
    real = meter.driver.read

    async def nan_reading() -> Any:
        r = await real()
        assert isinstance(r, MeterReading)
        return dataclasses.replace(r, grid_power_w=Reading.good(math.nan, "W", r.read_at_mono))

    mp.setattr(meter.driver, "read", nan_reading)


def snapshot_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(s.controller, "_snapshot", _raise)


def forecast_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(s.controller.forecaster, "forecast", _raise)


def forecast_nan(s: Site, mp: pytest.MonkeyPatch) -> None:
    real = s.controller.forecaster.forecast

    def with_nan(*args: Any) -> Any:
        f = real(*args)
        load = f.load_w.copy()
        load[0] = math.nan
        return dataclasses.replace(f, load_w=load, import_price=np.full(f.steps, math.nan))

    mp.setattr(s.controller.forecaster, "forecast", with_nan)


def decide_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(s.controller.decider, "decide", _raise_async)


def plan_nan(s: Site, mp: pytest.MonkeyPatch) -> None:
    dispatcher = s.controller.dispatcher
    assert dispatcher is not None
    real = dispatcher.solve

    def nan_plan(*args: Any, **kwargs: Any) -> Any:
        plan = real(*args, **kwargs)
        power = {d: (math.nan, *p[1:]) for d, p in plan.power_w.items()}
        return dataclasses.replace(plan, power_w=power)

    mp.setattr(dispatcher, "solve", nan_plan)


def guard_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(essd.cycle.guarding, "guard", _raise)


def guard_nan(s: Site, mp: pytest.MonkeyPatch) -> None:
    real = essd.cycle.guarding.guard

    def nan_guard(inp: Any) -> Any:
        res = real(inp)
        sps = {d: dataclasses.replace(sp, power_w=math.nan) for d, sp in res.setpoints.items()}
        return dataclasses.replace(res, setpoints=sps)

    mp.setattr(essd.cycle.guarding, "guard", nan_guard)


def publish_raises(s: Site, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(s.controller.accounting, "integrate", _raise)
    s.controller.bus.subscribe(_raise)


@pytest.mark.parametrize(
    ("inject", "phase", "cause", "worst_rung"),
    [
        (read_raises, "read", PlanCause.STALE_DATA, FallbackRung.SAFE_IDLE),
        (meter_reads_nan, None, PlanCause.STALE_DATA, FallbackRung.SAFE_IDLE),
        (snapshot_raises, "snapshot", PlanCause.STALE_DATA, FallbackRung.SAFE_IDLE),
        (forecast_raises, "forecast", PlanCause.FORECAST_FAILED, FallbackRung.RULE_BASED),
        (forecast_nan, "forecast", PlanCause.FORECAST_INVALID, FallbackRung.RULE_BASED),
        (decide_raises, "decide", PlanCause.DECIDE_FAILED, FallbackRung.RULE_BASED),
        (plan_nan, "decide", PlanCause.PLAN_INVALID, FallbackRung.RULE_BASED),
        (guard_raises, "guard", PlanCause.GUARD_FAILED, FallbackRung.SAFE_IDLE),
        (guard_nan, "guard", PlanCause.GUARD_FAILED, FallbackRung.SAFE_IDLE),
    ],
)
async def test_a_failing_phase_gives_a_published_cycle_a_typed_cause_and_safe_units(  # noqa: PLR0917
    site: Site,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
    inject: Inject,
    phase: str | None,
    cause: PlanCause,
    worst_rung: FallbackRung,
) -> None:
    published: list[CycleCompleted] = []
    site.controller.bus.subscribe(
        lambda e: published.append(e) if isinstance(e, CycleCompleted) else None
    )
    inject(site, monkeypatch)
    event = await site.cycle()  # must not raise
    assert published == [event]
    assert event.plan.cause is cause, event.plan.reason
    assert FallbackRung.LAST_PLAN <= event.plan.rung <= worst_rung
    if phase is not None:
        assert phase in event.phase_errors
    record = event.devices["inv"]
    assert math.isfinite(record.setpoint_w)
    if worst_rung is FallbackRung.SAFE_IDLE:
        assert record.setpoint_w == 0.0
        assert site.commanded_w() == 0.0
    else:  # rule-based self-consumption: within the load, never exporting
        assert 0.0 <= site.commanded_w() <= 3000.0 + 1.0
    assert record.write.status is not WriteStatus.FAILED


async def test_a_nan_forecast_with_no_previous_plan_still_rewrites_a_discharging_unit(
    site: Site,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Item 3 of the field report: the unit was left at 3,000 W until its own revert timer.
    await site.cycle()
    assert site.commanded_w() > 2000.0  # discharging into the 3 kW load (less the margin)
    site.controller.decider.last_plan = None  # as after a start: nothing to fall back on
    site.meter.set_field("grid_power_w", 1000.0)  # the load fell to 1 kW
    forecast_nan(site, monkeypatch)
    event = await site.cycle()
    assert site.controller.last_plan is None
    assert event.plan.cause is PlanCause.FORECAST_INVALID
    # Zero export holds: the unit was told to come down to what is still consumed.
    assert site.commanded_w() <= 1000.0 + 1.0
    assert event.devices["inv"].write.status is WriteStatus.WRITTEN


async def test_a_failing_write_is_recorded_and_the_other_phases_run(
    site: Site,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = site.controller.devices["inv"]
    monkeypatch.setattr(device, "apply", _raise_async)
    events: list[Event] = []
    site.controller.bus.subscribe(events.append)
    event = await site.cycle()
    assert event.devices["inv"].write.status is WriteStatus.FAILED
    assert "injected failure" in event.devices["inv"].write.error
    assert event in events
    assert event.plan.rung is FallbackRung.OPTIMAL  # the plan itself was fine


async def test_a_later_good_cycle_recovers_the_optimal_rung(
    site: Site,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as mp:
        guard_raises(site, mp)
        bad = await site.cycle()
    assert bad.plan.cause is PlanCause.GUARD_FAILED
    good = await site.cycle()
    assert good.plan.rung is FallbackRung.OPTIMAL
    assert good.phase_errors == {}
    assert site.commanded_w() > 2000.0  # discharging into the 3 kW load (less the margin)


async def test_a_late_solve_on_a_real_time_clock_falls_back_and_is_never_stacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", 0.5)
    meter.set_field("grid_power_w", 3000.0)
    # A clock that runs in real time: the solve budget (0.1 s) is enforced.
    clock = SimClock(START, speed=1.0)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        pool = EndpointPool(clock=clock)
        ctl = build_controller(
            settings(server.port, solve_budget_s=0.1), clock=clock, bus=EventBus(), pool=pool
        )
        try:
            assert ctl.dispatcher is not None
            real = ctl.dispatcher.solve
            good = await ctl.run_cycle()
            assert good.plan.cause is PlanCause.OPTIMAL
            # The unit does what it was told, and the meter sees it.
            discharge = good.devices["inv"].setpoint_w
            inverter.set_field("power_w", discharge)
            meter.set_field("grid_power_w", 3000.0 - discharge)
            release = threading.Event()

            def stuck(*args: Any, **kwargs: Any) -> Any:
                release.wait(10.0)  # a solver thread that does not come back in time
                return real(*args, **kwargs)

            monkeypatch.setattr(ctl.dispatcher, "solve", stuck)
            late = await ctl.run_cycle()
            busy = await ctl.run_cycle()
            release.set()
        finally:
            await pool.close()
    assert late.plan.cause is PlanCause.SOLVE_LATE
    assert late.plan.rung is FallbackRung.LAST_PLAN  # the good plan, shifted to now
    # The stuck solve still runs: the next cycle does not start another one on top of it.
    assert busy.plan.cause is PlanCause.SOLVE_BUSY
    assert busy.plan.rung is FallbackRung.LAST_PLAN
    assert math.isfinite(busy.devices["inv"].setpoint_w)
