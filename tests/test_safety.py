"""The safety supervisor: invariants under random inputs, and hand-checked cycles."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from essd.domain import BatteryReading, DeviceClass, LiveLimits, Quality, Reading
from essd.safety import DeviceEnvelope, GuardInput, guard

TOL = 1e-6


def reading(
    dev: str,
    soc: float,
    power_w: float = 0.0,
    limits: LiveLimits | None = None,
    *,
    soc_quality: Quality = Quality.GOOD,
    available: bool = True,
) -> BatteryReading:
    return BatteryReading(
        device_id=dev,
        device_class=DeviceClass.INDUSTRIAL,
        read_at_mono=0.0,
        available=available,
        soc=Reading(soc if soc_quality is Quality.GOOD else None, "ratio", 0.0, soc_quality),
        power_w=Reading.good(power_w, "W", 0.0),
        limits=limits,
        capacity_wh=10_000.0,
    )


def envelope(dev: str, **kw: float | bool | None) -> DeviceEnvelope:
    args: dict[str, object] = {
        "device_id": dev,
        "capacity_wh": 10_000.0,
        "max_charge_w": 5_000.0,
        "max_discharge_w": 5_000.0,
        "reserve_soc": 0.1,
        "max_soc": 0.95,
    }
    args.update(kw)
    return DeviceEnvelope(**args)  # type: ignore[arg-type]


def run(
    envs: list[DeviceEnvelope],
    reads: list[BatteryReading],
    desired: dict[str, float],
    *,
    grid: float | None = 0.0,
    import_limit: float = 1e9,
    export_limit: float = 1e9,
    previous: dict[str, float] | None = None,
    healthy: dict[str, bool] | None = None,
    ttl: float = 60.0,
    cap: float | None = None,
) -> dict[str, float]:
    res = guard(
        GuardInput(
            now_mono=100.0,
            dt_s=10.0,
            ttl_s=ttl,
            envelopes={e.device_id: e for e in envs},
            readings={r.device_id: r for r in reads},
            healthy=healthy or {e.device_id: True for e in envs},
            desired_w=desired,
            previous_w=previous or {},
            grid_power_w=grid,
            import_limit_w=import_limit,
            export_limit_w=export_limit,
            charge_import_cap_w=cap,
        )
    )
    return {d: s.power_w for d, s in res.setpoints.items()}


# --- given these readings and requests, these setpoints -------------------------------------


def test_request_within_every_limit_passes_unchanged() -> None:
    out = run([envelope("a")], [reading("a", 0.5)], {"a": 3000.0})
    assert out == {"a": 3000.0}


def test_live_bms_limit_tightens_the_rating() -> None:
    out = run([envelope("a")], [reading("a", 0.5, limits=LiveLimits(1000, 2000))], {"a": -4000.0})
    assert out == {"a": -1000.0}


def test_no_discharge_at_or_below_reserve() -> None:
    assert run([envelope("a")], [reading("a", 0.1)], {"a": 3000.0}) == {"a": 0.0}
    assert run([envelope("a")], [reading("a", 0.05)], {"a": -2000.0}) == {"a": -2000.0}


def test_discharge_near_reserve_is_limited_by_the_energy_left_over_the_ttl() -> None:
    # 0.5 % of 10 kWh above reserve = 50 Wh * 0.95; over a 60 s TTL that allows 2850 W.
    out = run([envelope("a")], [reading("a", 0.105)], {"a": 5000.0})
    assert out["a"] == pytest.approx(0.005 * 10_000 * 0.95 * 60, rel=1e-9)


def test_no_charge_above_max_soc() -> None:
    assert run([envelope("a")], [reading("a", 0.96)], {"a": -3000.0}) == {"a": 0.0}


def test_stale_or_invalid_device_idles() -> None:
    envs = [envelope("a"), envelope("b")]
    reads = [reading("a", 0.5), reading("b", 0.5, soc_quality=Quality.INVALID)]
    out = run(envs, reads, {"a": 2000.0, "b": 2000.0}, healthy={"a": False, "b": True})
    assert out == {"a": 0.0, "b": 0.0}


def test_unplugged_device_idles() -> None:
    out = run([envelope("a")], [reading("a", 0.5, available=False)], {"a": -1000.0})
    assert out == {"a": 0.0}


def test_unit_without_discharge_setpoint_only_charges() -> None:
    out = run([envelope("p", can_discharge=False)], [reading("p", 0.5)], {"p": 800.0})
    assert out == {"p": 0.0}


def test_zero_export_cuts_discharge_from_the_meter() -> None:
    # Net load 1000 W (battery idle); a 3000 W discharge would export 2000 W.
    out = run([envelope("a")], [reading("a", 0.5)], {"a": 3000.0}, grid=1000.0, export_limit=0.0)
    assert out == {"a": 1000.0}


def test_closed_loop_uses_measured_battery_power() -> None:
    # The battery already discharges 2000 W and the meter shows 500 W export: net load 1500 W.
    out = run(
        [envelope("a")], [reading("a", 0.5, 2000.0)], {"a": 2000.0}, grid=-500.0, export_limit=0.0
    )
    assert out == {"a": 1500.0}


def test_import_limit_reduces_charging_then_adds_discharge() -> None:
    envs = [envelope("a"), envelope("b")]
    reads = [reading("a", 0.5), reading("b", 0.5)]
    # Net load 8000 W, limit 6000: a's 3000 W charge must go, then 2000 W more discharge.
    out = run(envs, reads, {"a": -3000.0, "b": 0.0}, grid=8000.0, import_limit=6000.0)
    assert sum(out.values()) == pytest.approx(2000.0)
    assert min(out.values()) >= 0.0


def test_without_a_meter_every_device_idles() -> None:
    out = run([envelope("a")], [reading("a", 0.5)], {"a": 2000.0}, grid=None)
    assert out == {"a": 0.0}


def test_ramp_limits_change_but_not_a_safety_clamp() -> None:
    env = envelope("a", ramp_w_per_s=50.0)  # 500 W per 10 s cycle
    assert run([env], [reading("a", 0.5)], {"a": 3000.0}, previous={"a": 1000.0}) == {"a": 1500.0}
    # The BMS drops the limit to 0: the clamp acts at once, whatever the ramp.
    out = run(
        [env], [reading("a", 0.5, limits=LiveLimits(0, 0))], {"a": 3000.0}, previous={"a": 3000.0}
    )
    assert out == {"a": 0.0}


# --- invariants under random inputs ----------------------------------------------------------

power = st.floats(-20_000, 20_000, allow_nan=False)
maybe_power = st.one_of(power, st.just(math.nan), st.just(math.inf))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 5))
    envs, reads, desired, previous, healthy = [], [], {}, {}, {}
    for i in range(n):
        dev = f"d{i}"
        reserve = draw(st.floats(0.0, 0.5))
        max_soc = draw(st.floats(reserve + 0.05, 1.0))
        env = envelope(
            dev,
            capacity_wh=draw(st.floats(500, 500_000)),
            max_charge_w=draw(st.floats(0, 10_000)),
            max_discharge_w=draw(st.floats(0, 10_000)),
            reserve_soc=reserve,
            max_soc=max_soc,
            can_discharge=draw(st.booleans()),
            ramp_w_per_s=draw(st.one_of(st.none(), st.floats(1, 1000))),
        )
        envs.append(env)
        limits = draw(
            st.one_of(st.none(), st.builds(LiveLimits, st.floats(0, 12_000), st.floats(0, 12_000)))
        )
        reads.append(reading(dev, draw(st.floats(0, 1)), draw(power), limits))
        desired[dev] = draw(maybe_power)
        previous[dev] = draw(power)
        healthy[dev] = draw(st.booleans())
    return {
        "envs": envs,
        "reads": reads,
        "desired": desired,
        "previous": previous,
        "healthy": healthy,
        "grid": draw(st.one_of(st.none(), st.floats(-50_000, 50_000))),
        "import_limit": draw(st.floats(0, 60_000)),
        "export_limit": draw(st.floats(0, 60_000)),
        "ttl": draw(st.floats(20, 600)),
        "cap": draw(st.one_of(st.none(), st.floats(0, 60_000))),
    }


@settings(max_examples=400, deadline=None)
@given(sc=scenarios())
def test_no_setpoint_leaves_live_limits_soc_window_or_site_limits(sc: dict[str, object]) -> None:
    envs: list[DeviceEnvelope] = sc["envs"]  # type: ignore[assignment]
    reads: list[BatteryReading] = sc["reads"]  # type: ignore[assignment]
    healthy: dict[str, bool] = sc["healthy"]  # type: ignore[assignment]
    grid: float | None = sc["grid"]  # type: ignore[assignment]
    ttl: float = sc["ttl"]  # type: ignore[assignment]
    out = run(
        envs,
        reads,
        sc["desired"],  # type: ignore[arg-type]
        grid=grid,
        import_limit=sc["import_limit"],  # type: ignore[arg-type]
        export_limit=sc["export_limit"],  # type: ignore[arg-type]
        previous=sc["previous"],  # type: ignore[arg-type]
        healthy=healthy,
        ttl=ttl,
        cap=sc["cap"],  # type: ignore[arg-type]
    )
    by_id = {r.device_id: r for r in reads}
    lo_sum = hi_sum = 0.0
    for env in envs:
        p = out[env.device_id]
        r = by_id[env.device_id]
        assert math.isfinite(p)
        if not healthy[env.device_id] or grid is None:
            assert p == 0.0
            continue
        live = r.limits or LiveLimits(1e12, 1e12)
        assert -min(env.max_charge_w, live.max_charge_w) - TOL <= p
        assert p <= min(env.max_discharge_w, live.max_discharge_w) + TOL
        if not env.can_discharge:
            assert p <= 0.0
        soc = r.soc.value
        assert soc is not None
        hours = ttl / 3600
        # Over its whole TTL the setpoint cannot cross the SoC window.
        if p > 0:
            assert soc - p * hours / env.discharge_efficiency / env.capacity_wh >= (
                env.reserve_soc - 1e-9
            )
        if p < 0:
            assert soc - p * hours * env.charge_efficiency / env.capacity_wh <= env.max_soc + 1e-9
        b_lo = max(
            -min(env.max_charge_w, live.max_charge_w),
            -(env.max_soc - soc) * env.capacity_wh / env.charge_efficiency / hours,
        )
        b_hi = min(
            min(env.max_discharge_w, live.max_discharge_w) if env.can_discharge else 0.0,
            (soc - env.reserve_soc) * env.capacity_wh * env.discharge_efficiency / hours,
        )
        lo_sum += min(0.0, b_lo)
        hi_sum += max(0.0, b_hi)
    if grid is None:
        return
    base = grid + sum(r.power_w.value or 0.0 for r in reads)
    predicted = base - sum(out.values())
    import_limit: float = sc["import_limit"]  # type: ignore[assignment]
    export_limit: float = sc["export_limit"]  # type: ignore[assignment]
    # Site limits hold whenever the devices' headroom makes that possible.
    if base - hi_sum <= import_limit:
        assert predicted <= import_limit + 1e-3 + len(envs) * 1.0
    if base - lo_sum >= -export_limit:
        assert predicted >= -export_limit - 1e-3 - len(envs) * 1.0
    cap: float | None = sc["cap"]  # type: ignore[assignment]
    if cap is None:
        return
    # The billed-peak cap only takes charging back: against the same cycle without it, no
    # unit charges more, none discharges more than idle would, and the import is at the cap
    # wherever taking charging back could reach it.
    free = run(
        envs,
        reads,
        sc["desired"],  # type: ignore[arg-type]
        grid=grid,
        import_limit=import_limit,
        export_limit=export_limit,
        previous=sc["previous"],  # type: ignore[arg-type]
        healthy=healthy,
        ttl=ttl,
    )
    for dev, p in out.items():
        assert p >= free[dev] - TOL
        assert p <= max(free[dev], 0.0) + TOL
    undone = base - sum(max(p, 0.0) for p in free.values())  # every charge taken back
    if undone <= cap:
        assert predicted <= cap + 1e-3 + len(envs) * 1.0


def test_charging_never_takes_the_import_above_the_billed_peak() -> None:
    """The meter imports 8 kW while the units are idle and the peak so far is 10 kW: of 5 kW
    of charging asked for, 2 kW is let through; discharge asked for is untouched."""
    envs = [envelope("a"), envelope("b")]
    reads = [reading("a", 0.5), reading("b", 0.5)]
    out = run(envs, reads, {"a": -3000.0, "b": -2000.0}, grid=8000.0, cap=10_000.0)
    assert sum(out.values()) == pytest.approx(-2000.0)
    assert all(-3000.0 - TOL <= p <= 0.0 for p in out.values())
    out = run(envs, reads, {"a": 1000.0, "b": -2000.0}, grid=8000.0, cap=10_000.0)
    assert out == {"a": pytest.approx(1000.0), "b": pytest.approx(-2000.0)}  # 7 kW: under it
    assert run(envs, reads, {"a": -3000.0, "b": -2000.0}, grid=8000.0) == {
        "a": pytest.approx(-3000.0),
        "b": pytest.approx(-2000.0),
    }  # no cap: the plan's charging as asked


def test_the_billed_peak_cap_only_undoes_charging() -> None:
    """Already above the cap without the batteries: charging stops, but nothing is turned
    into discharge (the plan decides whether shaving is worth it), and no export follows."""
    envs = [envelope("a")]
    out = run(envs, [reading("a", 0.5)], {"a": -3000.0}, grid=12_000.0, cap=10_000.0)
    assert out == {"a": 0.0}
    out = run(
        [envelope("a")], [reading("a", 0.5)], {"a": -500.0}, grid=200.0, cap=0.0, export_limit=0.0
    )
    assert out["a"] <= 0.0  # with a zero cap and zero export, idle at most, never discharge
