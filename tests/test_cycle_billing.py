"""The billing window the accounting keeps: intervals split at clock-aligned windows of the
tariff's length, and what the meter measured of the window under way (for the plan's first
step)."""

from __future__ import annotations

from dataclasses import replace
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.cycle.accounting import Accounting, PeakTracker
from essd.daemon import build_controller
from essd.domain import Snapshot
from essd.events import EventBus
from essd.forecast import Forecast
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage
from tests.test_cycle import START, settings

TZ = ZoneInfo("Europe/Berlin")
W0 = 1_749_000_600.0  # a clock-aligned 15-minute window start (2025-06-04 01:30 UTC)
assert W0 % 900.0 == 0.0


def test_the_cycle_at_a_window_start_reports_the_window_before() -> None:
    """5-minute cycles: the interval that ends at 10:45 belongs to 10:30-10:45."""
    peak = PeakTracker(900.0, TZ)
    for k, grid_w in enumerate((90_000.0, 30_000.0, 30_000.0, 10_000.0, 10_000.0, 10_000.0)):
        peak.add(W0 + 300.0 * (k + 1), grid_w, 300.0)
    # The window W0 (90, 30, 30 kW) closed when the next one started: 50 kW, not a mix.
    assert peak.peak_w == pytest.approx(50_000.0)
    # The window under way at its end: 10 kW for the whole window.
    wh, s = peak.so_far(W0 + 1800.0 - 1e-6, None, 0.0)
    assert wh == pytest.approx(10_000.0 * 900.0 / 3600.0)
    assert s == pytest.approx(900.0, abs=1e-5)


def test_an_interval_across_a_window_start_is_split() -> None:
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 600.0, 36_000.0, 600.0)  # W0 .. W0+600 at 36 kW
    peak.add(W0 + 1200.0, 36_000.0, 600.0)  # W0+600 .. W0+1200: 300 s each side
    wh, s = peak.so_far(W0 + 1200.0, None, 0.0)
    assert (wh, s) == (pytest.approx(36_000.0 * 300.0 / 3600.0), pytest.approx(300.0))
    peak.add(W0 + 1800.0, 0.0, 600.0)
    assert peak.peak_w == pytest.approx(36_000.0)


def test_one_cycle_per_window_measures_nothing_of_the_window_under_way() -> None:
    """At a window's start the window under way is empty, pending interval or not: the plan's
    first step is then planned as a whole window, as before."""
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 900.0, 50_000.0, 900.0)
    assert peak.so_far(W0 + 900.0, None, 0.0) == (0.0, 0.0)
    assert peak.so_far(W0 + 900.0, 70_000.0, 900.0) == (0.0, 0.0)


def _at(t: float, mono: float) -> Snapshot:
    return Snapshot(time=t, mono=mono, batteries={}, meter=None)


def test_the_pending_interval_counts_before_it_is_integrated() -> None:
    """The decide phase runs before the cycle's integration: the accounting counts the interval
    since the last cycle at the grid just read."""
    acc = Accounting(900.0, TZ, 0.0)
    fc = Forecast(
        start=W0,
        step_s=900.0,
        load_w=np.zeros(1),
        pv_w=np.zeros(1),
        import_price=np.full(1, 0.2),
        export_price=np.full(1, 0.05),
        carbon_g_per_kwh=np.zeros(1),
    )
    snap = Snapshot(time=W0, mono=100.0, batteries={}, meter=None)
    acc.integrate(W0, 100.0, 20_000.0, snap, fc)  # the first cycle only starts the clock
    assert acc.billed_so_far(_at(W0 + 300.0, 400.0), 60_000.0) == (
        pytest.approx(60_000.0 * 300.0 / 3600.0),
        pytest.approx(300.0),
    )
    acc.integrate(W0 + 300.0, 400.0, 60_000.0, snap, fc)
    wh, s = acc.billed_so_far(_at(W0 + 600.0, 700.0), 0.0)
    assert (wh, s) == (pytest.approx(5_000.0), pytest.approx(600.0))
    # No grid reading: only what was integrated.
    assert acc.billed_so_far(_at(W0 + 600.0, 700.0), None) == (pytest.approx(5_000.0), 300.0)


def test_a_state_without_the_window_seconds_restores() -> None:
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 300.0, 12_000.0, 300.0)
    state = peak.state()
    assert state["window_s"] == pytest.approx(300.0)
    old = {k: v for k, v in state.items() if k != "window_s"}
    again = PeakTracker(900.0, TZ)
    again.restore(old)
    assert again.so_far(W0 + 400.0, None, 0.0) == (pytest.approx(1000.0), 0.0)
    with pytest.raises(ValueError, match="window_s"):
        again.restore({**state, "window_s": -1.0})


def test_a_window_longer_than_the_step_bills_its_average() -> None:
    """30-minute windows with 15-minute steps: 60 then 20 kW bill 40 kW, not 60."""
    peak = PeakTracker(1800.0, TZ)
    w0 = W0 - (W0 % 1800.0)
    peak.add(w0 + 900.0, 60_000.0, 900.0)
    peak.add(w0 + 1800.0, 20_000.0, 900.0)
    peak.add(w0 + 2700.0, 0.0, 900.0)  # the next window closes the first
    assert peak.peak_w == pytest.approx(40_000.0)


def test_a_state_of_another_window_length_drops_the_window_under_way() -> None:
    """A window saved at 15 minutes is not one of a 30-minute tracker: its energy would be
    billed over the wrong length when the next interval closes it. The month's peak stays."""
    w0 = W0 + 900.0 if W0 % 1800.0 == 0.0 else W0  # a 15-minute but not 30-minute boundary
    assert w0 % 1800.0 != 0.0
    peak = PeakTracker(900.0, TZ)
    peak.add(w0 + 300.0, 80_000.0, 300.0)
    peak.peak_w = 5_000.0  # a month's peak from earlier windows
    again = PeakTracker(1800.0, TZ)
    again.restore(peak.state())
    again.add(w0 + 600.0, 0.0, 300.0)
    assert again.peak_w == pytest.approx(5_000.0)


@pytest.mark.parametrize(("window_s", "billed"), [(None, False), (60.0, True)])
async def test_the_record_bills_the_tariffs_window(window_s: float | None, billed: bool) -> None:
    """The meter imports 1 kW for 2 minutes of 10-s cycles: a 1-minute billing window
    (tariff.demand_window_s) has closed and is billed; the default (the 15-minute step) not."""
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", 0.1)  # at reserve: it stays idle, the meter's import is the load
    inverter.set_field("power_w", 0.0)
    meter.set_field("grid_power_w", 1000.0)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        base = settings(server.port)
        tariff = base.tariff.model_copy(update={"demand_window_s": window_s})
        clock = SimClock(START - START % 900.0)
        pool = EndpointPool(clock=clock)
        ctl = build_controller(
            base.model_copy(update={"tariff": tariff}), clock=clock, bus=EventBus(), pool=pool
        )
        try:
            for _ in range(13):
                event = await ctl.run_cycle()
                clock.advance(10.0)
        finally:
            await pool.close()
    assert event.billing_peak_w == (pytest.approx(1000.0) if billed else 0.0)


@pytest.mark.parametrize(
    ("demand_charge", "source", "expected_w"),
    [(12.0, "rung3", -2000.0), (0.0, "rung3", -5000.0), (12.0, "manual", -5000.0)],
)
async def test_charging_under_a_plan_never_raises_the_billed_peak(
    demand_charge: float, source: str, expected_w: float
) -> None:
    """A plan (here an older one, as rung 3 applies) asks for 5 kW of charging that it
    expected to take the import to 8 kW; the load has since risen and the meter reads 7 kW
    with the unit idle, the month's billed peak is 9 kW. With a demand charge the guard lets
    2 kW through (to 9 kW, the higher of the two); without one, or under a manual setpoint, the
    whole 5 kW (the site's import limit, 20 kW here, is far above)."""
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", 0.1)  # at reserve: the real cycles before idle it
    inverter.set_field("power_w", 0.0)
    meter.set_field("grid_power_w", 7000.0)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        base = settings(server.port)
        tariff = base.tariff.model_copy(update={"demand_charge_per_kw": demand_charge})
        site = base.site.model_copy(update={"grid_import_limit_w": 20_000})
        clock = SimClock(START)
        pool = EndpointPool(clock=clock)
        ctl = build_controller(
            base.model_copy(update={"tariff": tariff, "site": site}),
            clock=clock,
            bus=EventBus(),
            pool=pool,
        )
        try:
            for _ in range(3):  # the meter's reading confirmed over cycles
                event = await ctl.run_cycle()
                clock.advance(10.0)
            plan = replace(event.plan, grid_w=(8000.0, *event.plan.grid_w[1:]))
            envelopes = {d.id: ctl._envelope(d) for d in ctl.batteries}
            result, _, _ = ctl._guard_phase(
                event.snapshot,
                envelopes,
                {"inv": -5000.0},
                plan,
                grid=7000.0,
                source=source,
                mono=event.snapshot.mono,
                standby=False,
                errors={},
                peak_w=9000.0,
            )
        finally:
            await pool.close()
    assert result.setpoints["inv"].power_w == pytest.approx(expected_w), result.reasons
