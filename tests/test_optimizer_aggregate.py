"""Identical units as one battery in the LP (essd.dispatch.aggregate): exact, honest, shared."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pydantic
import pytest

from essd.config import ControlConfig
from essd.dispatch import BatterySpec, Dispatcher, validate_inputs
from essd.dispatch.aggregate import Aggregation, auto_groups
from essd.dispatch.inputs import energy_window
from essd.dispatch.simulate import plan_cost
from essd.domain import FallbackRung, LiveLimits
from tests.support.optimizer import random_fleet, random_inputs

STEPS = 24


def identical(n: int, prefix: str = "u", **kw: object) -> list[BatterySpec]:
    base: dict[str, object] = {
        "capacity_wh": 10_000.0,
        "charge_efficiency": 0.95,
        "discharge_efficiency": 0.93,
        "degradation_cost_per_kwh": 0.02,
    }
    base.update(kw)
    return [BatterySpec(id=f"{prefix}{i}", **base) for i in range(n)]  # type: ignore[arg-type]


def lp_batteries(dispatcher: Dispatcher) -> int:
    """How many batteries the dispatcher's LP has."""
    charge = next(v for v in dispatcher.problem().variables() if v.name() == "charge_kw")
    return int(charge.shape[0])


def test_identical_units_with_equal_data_plan_exactly_as_the_full_lp() -> None:
    """Same specification and same live data: the aggregate loses nothing."""
    rng = np.random.default_rng(21)
    fleet = identical(5)
    inputs = random_inputs(rng, fleet, STEPS)
    same = dataclasses.replace(
        inputs,
        soc=dict.fromkeys(inputs.soc, 0.5),
        limits=dict.fromkeys(inputs.limits, LiveLimits(4000.0, 4000.0)),
        reserve_soc=dict.fromkeys(inputs.soc, 0.1),
        max_soc=dict.fromkeys(inputs.soc, 0.9),
        availability={},
        previous_setpoint_w={},
        terminal_soc={},
    )
    full = Dispatcher(fleet, STEPS).solve(same, budget_s=10.0, last_plan=None)
    grouped = Dispatcher(fleet, STEPS, aggregate=True)
    assert lp_batteries(grouped) == 1
    agg = grouped.solve(same, budget_s=10.0, last_plan=None)
    assert full.rung is FallbackRung.OPTIMAL, full.reason
    assert agg.rung is FallbackRung.OPTIMAL, agg.reason
    assert agg.objective == pytest.approx(full.objective, rel=1e-6, abs=1e-6)
    total_full = np.sum([full.power_w[i] for i in full.device_ids], axis=0)
    total_agg = np.sum([agg.power_w[i] for i in agg.device_ids], axis=0)
    np.testing.assert_allclose(total_agg, total_full, atol=1e-3)
    first = np.asarray(agg.power_w["u0"])
    for unit in agg.device_ids:
        np.testing.assert_allclose(agg.power_w[unit], first, atol=1e-6)


def test_units_with_different_soc_stay_within_their_own_limits_and_window() -> None:
    """An approximation when the SoCs differ, but every unit's plan is one it can follow."""
    rng = np.random.default_rng(22)
    fleet = identical(6) + identical(3, prefix="v", capacity_wh=5000.0)
    dispatcher = Dispatcher(fleet, STEPS, aggregate=True)
    assert lp_batteries(dispatcher) == 2  # two kinds of unit
    for _ in range(8):
        inputs = random_inputs(rng, fleet, STEPS)
        plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
        assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
        a = validate_inputs(fleet, STEPS, inputs)
        for k, b in enumerate(fleet):
            power = np.asarray(plan.power_w[b.id]) / 1000.0
            assert np.all(power <= a.ub_d[k] + 1e-9)
            assert np.all(-power <= a.ub_c[k] + 1e-9)
            soc = np.asarray(plan.soc[b.id][1:])
            lo = min(inputs.reserve_soc[b.id], inputs.soc[b.id])
            hi = max(inputs.max_soc[b.id], inputs.soc[b.id])
            assert np.all(soc >= lo - 1e-6)
            assert np.all(soc <= hi + 1e-6)


def test_split_keeps_the_group_total_and_each_limit() -> None:
    """Shares add up to the group's power wherever the members' limits allow it."""
    rng = np.random.default_rng(23)
    fleet = identical(4) + identical(3, prefix="v", can_discharge=False)
    agg = Aggregation.of(fleet)
    inputs = random_inputs(rng, fleet, STEPS)
    a = validate_inputs(fleet, STEPS, inputs)
    group = agg.arrays(a)
    power = rng.uniform(-1.0, 1.0, group.ub_c.shape) * np.where(
        rng.uniform(size=group.ub_c.shape) < 0.5, group.ub_c, group.ub_d
    )
    power = np.clip(power, -group.ub_c, group.ub_d)
    shared = agg.split(power, a, *energy_window(fleet, a, a.ub_c, a.ub_d))
    np.testing.assert_allclose(agg.member_of @ shared, power, atol=1e-9)
    assert np.all(shared <= a.ub_d + 1e-12)
    assert np.all(-shared <= a.ub_c + 1e-12)


def test_distinct_units_are_not_grouped() -> None:
    """Nothing identical: the LP keeps one battery per unit."""
    fleet = random_fleet(np.random.default_rng(24), 3)
    assert not Aggregation.of(fleet).reduces
    dispatcher = Dispatcher(fleet, STEPS, aggregate=True)
    assert lp_batteries(dispatcher) == 3


def test_units_of_one_kind_with_different_soc_lose_little_plan_value() -> None:
    """Equal limits, different SoCs: shares by headroom reach the window's edges together,
    so the units' plan is worth what the full LP's is (value as benchmarks/ computes it)
    unless a unit's power limit binds first."""
    rng = np.random.default_rng(25)
    fleet = identical(4) + identical(2, prefix="v", capacity_wh=5000.0)
    full = Dispatcher(fleet, STEPS)
    grouped = Dispatcher(fleet, STEPS, aggregate=True)
    losses = []
    for _ in range(5):
        inputs = dataclasses.replace(
            random_inputs(rng, fleet, STEPS),
            soc={b.id: float(rng.uniform(0.2, 0.8)) for b in fleet},
            limits={b.id: LiveLimits(b.capacity_wh / 2, b.capacity_wh / 2) for b in fleet},
            reserve_soc={b.id: 0.1 for b in fleet},
            max_soc={b.id: 0.9 for b in fleet},
            availability={},
            previous_setpoint_w={},
            terminal_soc={},
            import_limit_w=math.inf,
            export_limit_w=math.inf,
        )
        a = validate_inputs(fleet, STEPS, inputs)
        values = []
        for dispatcher in (full, grouped):
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
            power = np.array([plan.power_w[b.id] for b in fleet]) / 1000.0
            cost, _ = plan_cost(fleet, a, power)
            final = sum(plan.soc[b.id][-1] * b.capacity_wh / 1000.0 for b in fleet)
            values.append(cost - a.terminal_value * final)
        losses.append((values[1] - values[0]) / max(abs(values[0]), 1.0))
    # Exact unless a member's power limit binds before the group's (then a little is lost).
    assert max(losses) < 0.01, losses
    assert sum(abs(x) < 1e-6 for x in losses) >= 3, losses


def test_clusters_of_similar_units_stay_honest_and_lose_little() -> None:
    """Different units as a few groups: every unit's plan is one it can follow, and the plan
    is worth nearly what the full LP's is. Measured here (12 units in 4 groups, random prices):
    1.6-4.7 %; the benchmark's 100 units in 10 groups on its daily profile: ~0.5 %. The loss
    grows with how different the units in a group are."""
    rng = np.random.default_rng(26)
    # Units as different as a real site's (the optimizer benchmark's ranges).
    fleet = [
        BatterySpec(
            id=f"unit{k}",
            capacity_wh=float(rng.uniform(5e3, 50e3)),
            charge_efficiency=float(rng.uniform(0.92, 0.97)),
            discharge_efficiency=float(rng.uniform(0.92, 0.97)),
            degradation_cost_per_kwh=float(rng.uniform(0.01, 0.05)),
            can_discharge=k % 6 != 5,
        )
        for k in range(12)
    ]
    full = Dispatcher(fleet, STEPS)
    grouped = Dispatcher(fleet, STEPS, clusters=4)
    assert lp_batteries(grouped) == 4
    losses = []
    for _ in range(4):
        inputs = dataclasses.replace(
            random_inputs(rng, fleet, STEPS),
            soc={b.id: float(rng.uniform(0.2, 0.8)) for b in fleet},
            limits={b.id: LiveLimits(b.capacity_wh / 2, b.capacity_wh / 2) for b in fleet},
            reserve_soc={b.id: 0.1 for b in fleet},
            max_soc={b.id: 0.9 for b in fleet},
            availability={},
            previous_setpoint_w={},
            terminal_soc={},
            import_limit_w=math.inf,
            export_limit_w=math.inf,
        )
        a = validate_inputs(fleet, STEPS, inputs)
        values = []
        for dispatcher in (full, grouped):
            plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
            assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
            power = np.array([plan.power_w[b.id] for b in fleet]) / 1000.0
            assert np.all(power <= a.ub_d[:, :] + 1e-9)
            assert np.all(-power <= a.ub_c[:, :] + 1e-9)
            cost, _ = plan_cost(fleet, a, power)
            final = sum(plan.soc[b.id][-1] * b.capacity_wh / 1000.0 for b in fleet)
            values.append(cost - a.terminal_value * final)
        losses.append((values[1] - values[0]) / max(abs(values[0]), 1.0))
    # The full LP is optimal for this value up to its tiny churn term: never much worse.
    assert min(losses) > -1e-3, losses
    assert max(losses) < 0.06, losses


def test_clusters_never_mix_units_that_cannot_discharge() -> None:
    """A charge-only unit is grouped only with charge-only units; the count is validated."""
    fleet = random_fleet(np.random.default_rng(27), 10)
    fleet = [dataclasses.replace(b, can_discharge=k % 5 != 0) for k, b in enumerate(fleet)]
    agg = Aggregation.clustered(fleet, 3)
    for row, spec in zip(agg.member_of, agg.specs, strict=True):
        members = [fleet[k] for k in np.flatnonzero(row)]
        assert {b.can_discharge for b in members} == {spec.can_discharge}
        assert spec.capacity_wh == pytest.approx(sum(b.capacity_wh for b in members))
    np.testing.assert_array_equal(agg.member_of.sum(axis=0), np.ones(10))
    with pytest.raises(ValueError, match="clusters"):
        Dispatcher(fleet, STEPS, clusters=0)


def test_the_control_options_are_validated() -> None:
    """Both options live in [control]; on by default; a cluster count below one is refused."""
    assert ControlConfig().aggregate_identical_units
    assert ControlConfig().aggregate_clusters == "auto"
    assert not ControlConfig(aggregate_identical_units=False).aggregate_identical_units
    assert ControlConfig(aggregate_clusters=10).aggregate_clusters == 10
    assert ControlConfig(aggregate_clusters=None).aggregate_clusters is None
    for bad in (0, "some"):
        with pytest.raises(pydantic.ValidationError, match="aggregate_clusters"):
            ControlConfig(aggregate_clusters=bad)


def test_auto_groups_keep_the_lp_within_its_size() -> None:
    """ "auto" groups only an LP past 3,000 battery-steps, into as many groups as fit."""
    assert auto_groups(31, 96) is None
    assert auto_groups(32, 96) == 31
    assert auto_groups(100, 288) == 10
    assert auto_groups(10, 288) is None
    assert auto_groups(3, 2000) == 1
    rng = np.random.default_rng(31)
    different = random_fleet(rng, 40)
    assert Dispatcher(different, 96, clusters="auto").lp_batteries <= 31
    assert Dispatcher(different, 48, clusters="auto").lp_batteries == 40  # fits: full LP
    # Identical units grouped first: four kinds of 40 units fit, so no approximation is made.
    kinds = [dataclasses.replace(different[k % 4], id=f"u{k}") for k in range(40)]
    assert Dispatcher(kinds, 288, aggregate=True, clusters="auto").lp_batteries == 4
    assert Dispatcher(kinds, 288, clusters="auto").lp_batteries == 10
