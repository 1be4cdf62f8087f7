"""Battery physics of the simulator: SoC bounds, energy balance, limits, thermal trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from essd.clock import SimClock
from hil_sim.battery import Alarm, Battery, BatteryParams

PARAMS = BatteryParams(
    capacity_wh=10_000.0,
    max_charge_w=5_000.0,
    max_discharge_w=6_000.0,
    charge_efficiency=0.96,
    discharge_efficiency=0.94,
    self_discharge_per_day=0.01,
    taper_soc=0.1,
)

params_st = st.builds(
    BatteryParams,
    capacity_wh=st.floats(100.0, 500_000.0),
    max_charge_w=st.floats(0.0, 200_000.0),
    max_discharge_w=st.floats(0.0, 200_000.0),
    charge_efficiency=st.floats(0.5, 1.0),
    discharge_efficiency=st.floats(0.5, 1.0),
    self_discharge_per_day=st.floats(0.0, 0.1),
    taper_soc=st.floats(0.0, 0.5),
    thermal_resistance_k_per_w=st.floats(0.0001, 0.05),
)
# (command W, then seconds to let pass) pairs; power far beyond any limit is included on purpose.
steps_st = st.lists(
    st.tuples(st.floats(-1e6, 1e6), st.floats(0.0, 3 * 3600.0)), min_size=1, max_size=8
)


@settings(max_examples=100, deadline=None)
@given(params=params_st, soc0=st.floats(0.0, 1.0), steps=steps_st)
def test_soc_stays_within_bounds_and_energy_balances(
    params: BatteryParams, soc0: float, steps: list[tuple[float, float]]
) -> None:
    clock = SimClock()
    bat = Battery(params, clock, initial_soc=soc0)
    e0 = bat.state().energy_wh
    for power, dt in steps:
        bat.command(power)
        clock.advance(dt)
        s = bat.state()
        assert 0.0 <= s.soc <= 1.0
        # What flows now never exceeds the live limits published now.
        assert -s.limits.max_charge_w - 1e-9 <= s.power_w <= s.limits.max_discharge_w + 1e-9
    s = bat.state()
    # Energy balance: the cells gain eta_c * charged and lose discharged / eta_d and the
    # self-discharge, nothing else.
    expected = (
        e0
        + params.charge_efficiency * s.charged_wh
        - s.discharged_wh / params.discharge_efficiency
        - s.self_discharge_wh
    )
    assert s.energy_wh == pytest.approx(expected, rel=1e-9, abs=1e-6 * params.capacity_wh)
    total_s = sum(dt for _, dt in steps)
    # Self-discharge is bounded by the daily rate applied to a full battery all along.
    rate_per_s = -math.log1p(-params.self_discharge_per_day) / 86_400
    bound = params.capacity_wh * rate_per_s * total_s
    assert 0.0 <= s.self_discharge_wh <= bound + 1e-6
    # Commanded power beyond the live limits is never delivered, in any sub-step.
    assert s.max_overshoot_w <= 1e-9
    # ... and on average never more than the nameplate (epoch seconds near 1.8e9 carry
    # ~2e-7 s of rounding per clock step).
    elapsed_h = (total_s + 1e-6 * len(steps)) / 3600
    assert s.charged_wh <= params.max_charge_w * elapsed_h + 1e-6
    assert s.discharged_wh <= params.max_discharge_w * elapsed_h + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    soc0=st.floats(0.0, 1.0),
    window=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    steps=steps_st,
)
def test_soc_window_is_never_crossed_by_the_battery_itself(
    soc0: float, window: list[float], steps: list[tuple[float, float]]
) -> None:
    clock = SimClock()
    bat = Battery(PARAMS, clock, initial_soc=soc0)
    lo, hi = window
    bat.set_soc_window(lo, hi)
    for power, dt in steps:
        before = bat.state().soc
        bat.command(power)
        clock.advance(dt)
        after = bat.state().soc
        # Charging stops at the upper bound, discharging at the lower one (self-discharge may
        # still take a unit below its lower bound, as it does on real cells).
        if after > before + 1e-12:
            assert after <= max(hi, before) + 1e-9
        if after < before - 1e-9 and before > lo:
            assert after >= lo - 1e-3


def test_full_charge_tapers_and_stops_at_full() -> None:
    clock = SimClock()
    bat = Battery(PARAMS, clock, initial_soc=0.5)
    bat.command(-1e9)  # far beyond any limit
    assert bat.state().power_w == -PARAMS.max_charge_w
    clock.advance(3600)
    s = bat.state()
    assert s.soc > 0.9
    # Inside the taper band the charge limit shrinks with the headroom left.
    assert s.limits.max_charge_w == pytest.approx(PARAMS.max_charge_w * (1 - s.soc) / 0.1)
    clock.advance(48 * 3600)
    s = bat.state()
    assert s.soc == pytest.approx(1.0, abs=2e-3)
    assert s.power_w > -0.02 * PARAMS.max_charge_w


def test_discharge_stops_at_empty() -> None:
    clock = SimClock()
    bat = Battery(PARAMS, clock, initial_soc=0.2)
    bat.command(6_000.0)
    clock.advance(10 * 3600)
    s = bat.state()
    assert 0.0 <= s.soc < 0.01
    assert s.discharged_wh <= 0.2 * PARAMS.capacity_wh * PARAMS.discharge_efficiency + 1e-6


def test_self_discharge_alone_follows_the_daily_rate() -> None:
    clock = SimClock()
    bat = Battery(PARAMS, clock, initial_soc=1.0)
    clock.advance(86_400)
    assert bat.state().soc == pytest.approx(1.0 - PARAMS.self_discharge_per_day)


def test_stepped_and_fine_grained_integration_agree() -> None:
    # Lazy integration: one jump of 2 h gives the same result as 720 touches 10 s apart.
    coarse_clock, fine_clock = SimClock(), SimClock()
    coarse = Battery(PARAMS, coarse_clock, initial_soc=0.3)
    fine = Battery(PARAMS, fine_clock, initial_soc=0.3)
    coarse.command(-4_000.0)
    fine.command(-4_000.0)
    coarse_clock.advance(7200)
    for _ in range(720):
        fine_clock.advance(10)
        fine.state()
    assert coarse.state().soc == pytest.approx(fine.state().soc, abs=1e-3)


def test_heat_derates_then_trips_and_recovers_with_hysteresis() -> None:
    # A unit with poor cooling: full discharge power heats it past the trip point.
    hot = BatteryParams(
        capacity_wh=200_000.0,
        max_charge_w=50_000.0,
        max_discharge_w=50_000.0,
        discharge_efficiency=0.9,
        thermal_resistance_k_per_w=0.01,
        thermal_capacity_j_per_k=100_000.0,
    )
    clock = SimClock()
    bat = Battery(hot, clock, initial_soc=0.9)
    bat.command(50_000.0)
    seen_derating = False
    tripped_at = None
    for _ in range(400):
        clock.advance(30)
        s = bat.state()
        if Alarm.DERATING in s.alarms:
            seen_derating = True
            assert 0 < s.limits.max_discharge_w < hot.max_discharge_w
        if Alarm.OVER_TEMPERATURE in s.alarms:
            tripped_at = clock.now()
            break
    assert seen_derating
    # The derating holds the cells below the trip point at full command: the power it lets
    # through settles where the losses balance the cooling. It never trips on its own here...
    assert tripped_at is None
    assert bat.state().temperature_c < hot.trip_c
    # ... so inject the fault: limits go to 0 and the alarm bit is set while it lasts.
    bat.set_forced_fault(True)
    s = bat.state()
    assert s.limits.max_discharge_w == 0
    assert s.limits.max_charge_w == 0
    assert Alarm.OVER_TEMPERATURE in s.alarms
    assert Alarm.FORCED_FAULT in s.alarms
    e = s.discharged_wh
    clock.advance(3600)
    assert bat.state().discharged_wh == e  # nothing flows while tripped
    bat.set_forced_fault(False)
    clock.advance(60)
    assert Alarm.OVER_TEMPERATURE in bat.state().alarms  # latched until it cools down
    clock.advance(6 * 3600)
    s = bat.state()
    assert Alarm.OVER_TEMPERATURE not in s.alarms
    assert s.power_w > 0


def test_power_caps_and_bad_input() -> None:
    clock = SimClock()
    bat = Battery(PARAMS, clock, initial_soc=0.5)
    bat.set_power_caps(charge_w=1_000.0, discharge_w=0.0)
    bat.command(-3_000.0)
    assert bat.state().power_w == -1_000.0
    bat.command(3_000.0)
    assert bat.state().power_w == 0.0
    with pytest.raises(ValueError, match="power_w"):
        bat.command(math.nan)
    with pytest.raises(ValueError, match="initial_soc"):
        Battery(PARAMS, clock, initial_soc=1.5)
    with pytest.raises(ValueError, match="trip_c"):
        BatteryParams(capacity_wh=1.0, max_charge_w=1.0, max_discharge_w=1.0, trip_c=20.0)
