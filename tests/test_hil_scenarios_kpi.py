"""KPI arithmetic on hand-computable traces, and the limit checks on the true state."""

from __future__ import annotations

import math

import pytest

from essd.hil.kpi import (
    CostModel,
    CycleRecord,
    Sample,
    compute_kpis,
    unsafe_writes,
    violations_of,
)
from hil_sim.truth import BatteryTruth, Limits, SiteTruth

T0 = 1_782_864_000.0  # an hour boundary


def battery(
    power_w: float,
    *,
    soc: float = 0.5,
    commanded_w: float | None = None,
    max_w: float = 5000.0,
    alarm: bool = False,
    available: bool = True,
) -> BatteryTruth:
    return BatteryTruth(
        device_id="b",
        soc=soc,
        energy_wh=soc * 10_000.0,
        capacity_wh=10_000.0,
        power_w=power_w,
        commanded_w=power_w if commanded_w is None else commanded_w,
        max_charge_w=max_w,
        max_discharge_w=max_w,
        temperature_c=25.0,
        available=available,
        alarm=alarm,
        reverts=0,
    )


def sample(
    k: int, load: float, pv: float, bat: BatteryTruth, *, after_cycle: bool = False
) -> Sample:
    truth = SiteTruth(
        time=T0 + 3600 * k,
        load_w=load,
        pv_w=pv,
        pv_available_w=pv,
        grid_w=load - pv - bat.power_w,
        batteries={"b": bat},
    )
    return Sample(
        time=truth.time,
        dt_s=3600.0,
        truth=truth,
        import_price=1.0,
        export_price=0.5,
        carbon_g_per_kwh=500.0,
        after_cycle=after_cycle,
    )


LIMITS = Limits(
    reserve_soc={"b": 0.1},
    max_soc={"b": 0.9},
    max_charge_w={"b": 4000.0},
    max_discharge_w={"b": 4000.0},
    import_w=2500.0,
    export_w=1000.0,
)
MODEL = CostModel(carbon_price_per_kg=0.1, demand_charge_per_kw=10.0, demand_window_s=3600.0)


def cycle(k: int, setpoint_w: float) -> CycleRecord:
    return CycleRecord(
        cycle=k + 1,
        time=T0 + 3600 * k,
        rung=1 + k,
        reason="optimal",
        setpoints_w={"b": setpoint_w},
        device_states={"b": "running"},
        grid_belief_w=None,
        modbus_errors=2 * k,
        device_writes=3 * (k + 1),
    )


def test_costs_savings_and_battery_figures_by_hand() -> None:
    # Hour 1: 2 kW load from the grid. Hour 2: the battery covers 1 kW of it.
    samples = [sample(0, 2000, 0, battery(0.0)), sample(1, 2000, 0, battery(1000.0))]
    k = compute_kpis(
        scenario="hand",
        samples=samples,
        cycles=[cycle(0, 0.0), cycle(1, 1000.0)],
        limits=LIMITS,
        model=MODEL,
        wall_s=0.5,
        optimum_cost=22.0,
        optimum_status="rung 1: optimal",
    )
    # Energy 2 + 1 kWh at 1.0; CO2 3 kWh x 0.5 kg = 1.5 kg at 0.1; demand 2 kW x 10.
    assert k.energy_cost == pytest.approx(3.0)
    assert k.co2_kg == pytest.approx(1.5)
    assert k.carbon_cost == pytest.approx(0.15)
    assert k.demand_charge == pytest.approx(20.0)
    assert k.cost == pytest.approx(23.15)
    # Without the battery: 4 kWh, 2 kg CO2, the same 2 kW peak.
    assert k.baseline_cost == pytest.approx(4.0 + 0.2 + 20.0)
    assert k.savings == pytest.approx(1.05)
    assert k.cost_ratio == pytest.approx(23.15 / 24.2)
    assert k.optimum_savings == pytest.approx(24.2 - 22.0)
    assert k.savings_vs_optimum == pytest.approx(1.05 / 2.2)
    assert k.peak_import_w == pytest.approx(2000.0)
    assert k.imported_wh == pytest.approx(3000.0)
    assert k.battery_discharged_wh == pytest.approx(1000.0)
    assert k.battery_throughput_wh == pytest.approx(1000.0)
    assert k.equivalent_full_cycles == pytest.approx(0.1)
    assert k.self_consumption_ratio is None  # no PV at all
    assert k.rung_counts == {"1": 1, "2": 1}
    assert k.worst_rung == 2
    assert k.modbus_errors == 2
    assert k.device_writes == 6
    assert k.violations == 0


def test_self_consumption_and_export_by_hand() -> None:
    # 3 kW of PV, 1 kW load: hour 1 exports 2 kWh; hour 2 the battery stores 1.5 kW of it.
    samples = [sample(0, 1000, 3000, battery(0.0)), sample(1, 1000, 3000, battery(-1500.0))]
    model = CostModel()
    k = compute_kpis(
        scenario="pv", samples=samples, cycles=[], limits=LIMITS, model=model, wall_s=0.0
    )
    assert k.exported_wh == pytest.approx(2000.0 + 500.0)
    assert k.pv_wh == pytest.approx(6000.0)
    assert k.self_consumption_ratio == pytest.approx((6000 - 2500) / 6000)
    assert k.baseline_self_consumption_ratio == pytest.approx((6000 - 4000) / 6000)
    assert k.cost == pytest.approx(-2.5 * 0.5)
    assert k.baseline_cost == pytest.approx(-4.0 * 0.5)
    assert k.savings == pytest.approx(-0.75)  # storing PV that sells at 0.5 costs money here
    assert k.cost_ratio is None  # the baseline earns money: a ratio would mislead
    # 2 kW of export passes the 1 kW export limit; 0.5 kW in hour 2 does not.
    assert k.violations_by_kind == {"export_limit": 1}
    assert k.max_export_excess_w == pytest.approx(1000.0)


def test_violations_come_from_the_true_state() -> None:
    samples = [
        # Discharging below reserve: a violation; sitting below reserve idle is not.
        sample(0, 1000, 0, battery(500.0, soc=0.05)),
        sample(1, 1000, 0, battery(0.0, soc=0.05)),
        # Charging above max SoC.
        sample(2, 1000, 0, battery(-500.0, soc=0.95)),
        # Commanded beyond the configured 4 kW limit, judged right after a cycle only.
        sample(3, 1000, 0, battery(0.0, commanded_w=4500.0), after_cycle=True),
        sample(4, 1000, 0, battery(0.0, commanded_w=4500.0), after_cycle=False),
        # Import above 2.5 kW.
        sample(5, 3000, 0, battery(0.0)),
    ]
    kinds = [v.kind for v in violations_of(samples, LIMITS)]
    assert kinds == ["soc_below_reserve", "soc_above_max", "discharge_limit", "import_limit"]


def test_unsafe_writes_are_setpoints_the_truth_forbade() -> None:
    samples = [
        sample(0, 1000, 0, battery(0.0, alarm=True), after_cycle=True),
        sample(1, 1000, 0, battery(0.0, max_w=1000.0), after_cycle=True),
        sample(2, 1000, 0, battery(0.0, available=False), after_cycle=True),
        sample(3, 1000, 0, battery(0.0, alarm=True), after_cycle=True),
    ]
    cycles = [cycle(0, 300.0), cycle(1, 1500.0), cycle(2, -200.0), cycle(3, 0.0)]
    lines = unsafe_writes(samples, cycles)
    assert len(lines) == 3
    assert "cycle 1: b told 300 W while in alarm or away" in lines[0]
    assert "beyond its live limits" in lines[1]
    assert not any(line.startswith("cycle 4:") for line in lines)


def test_no_cost_ratio_when_the_run_earns_money() -> None:
    # A tiny baseline bill, a run that earns: a ratio would be a large negative number.
    samples = [sample(0, 1000, 990, battery(0.0)), sample(1, 1000, 1000, battery(2000.0))]
    k = compute_kpis(
        scenario="earns", samples=samples, cycles=[], limits=LIMITS, model=CostModel(), wall_s=0
    )
    assert k.baseline_cost > 0 > k.cost
    assert k.cost_ratio is None


def test_an_empty_run_has_no_figures_to_divide_by() -> None:
    k = compute_kpis(
        scenario="empty", samples=[], cycles=[], limits=LIMITS, model=MODEL, wall_s=0.0
    )
    assert k.cost == 0.0
    assert k.cost_ratio is None
    assert k.savings_vs_optimum is None
    assert math.isclose(k.equivalent_full_cycles, 0.0)


def test_draining_the_battery_is_not_counted_as_savings() -> None:
    """The run of the hand test drained 1 kWh (+ losses) from its battery. The optimum
    re-solved to the run's final SoC is cheaper by what that energy was worth to it, and the
    savings shrink by as much: the old figure (baseline - cost) would have called it saved."""
    samples = [sample(0, 2000, 0, battery(0.0)), sample(1, 2000, 0, battery(1000.0))]
    k = compute_kpis(
        scenario="hand",
        samples=samples,
        cycles=[cycle(0, 0.0), cycle(1, 1000.0)],
        limits=LIMITS,
        model=MODEL,
        wall_s=0.5,
        optimum_cost=24.2,  # ending where it started, the optimum can save nothing here
        optimum_cost_to_end_soc=23.15,  # ending lower, it may spend the 1 kWh as the run did
        optimum_status="rung 1: optimal",
    )
    assert k.uncorrected_savings == pytest.approx(1.05)
    assert k.savings == pytest.approx(0.0, abs=1e-9)
    assert k.optimum_savings == pytest.approx(0.0, abs=1e-9)
