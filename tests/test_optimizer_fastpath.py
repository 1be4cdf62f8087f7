"""The fast per-cycle path (essd.dispatch.lpmaps): the same LP and the same optimum as cvxpy."""

from __future__ import annotations

import dataclasses
from typing import Any

import cvxpy
import numpy as np
import pytest

import essd.dispatch.dispatcher
import essd.dispatch.inputs
from essd.dispatch import Dispatcher, ahead_inputs
from essd.dispatch.highs import HighsHotStart
from essd.dispatch.lpmaps import LpMaps, NotAffineError, highs_data
from essd.domain import FallbackRung
from tests.support.optimizer import T0, random_fleet, random_inputs, reference_solve

cp: Any = cvxpy


def test_maps_reproduce_cvxpy_problem_data_for_random_parameters() -> None:
    """Cost, offset, bounds and right-hand sides equal cvxpy's own, parameter set by set."""
    rng = np.random.default_rng(11)
    fleet = random_fleet(rng, 3)
    problem = Dispatcher(fleet, 24).problem()
    maps = LpMaps(problem)
    for _ in range(5):
        for param in problem.parameters():
            param.value = rng.normal(0.0, 3.0, param.shape)
        data, _chain, inverse = problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        want = highs_data(data, inverse[-1]["offset"])
        got = maps.data(maps.theta())
        assert (got.a_mat != want.a_mat).nnz == 0
        for name in ("cost", "col_lo", "col_up", "row_lo", "row_up"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12)
        assert got.offset == pytest.approx(want.offset, rel=1e-12, abs=1e-12)


def test_fast_path_and_plain_cvxpy_find_the_same_optimum() -> None:
    """Hot-started re-solves through the maps and cvxpy's own solve: same objective and plan."""
    rng = np.random.default_rng(12)
    compared = 0
    for steps, nb in ((24, 1), (48, 2), (96, 3)):
        fleet = random_fleet(rng, nb)
        fast = Dispatcher(fleet, steps)
        plain = Dispatcher(fleet, steps, hot_start=False)
        assert fast._lp_maps(fast._model(900.0)) is not None  # the fast path is in use
        for _ in range(6):
            inputs = random_inputs(rng, fleet, steps)
            a = fast.solve(inputs, budget_s=10.0, last_plan=None)
            b = plain.solve(inputs, budget_s=10.0, last_plan=None)
            assert a.rung == b.rung, (a.reason, b.reason)
            if a.rung not in (FallbackRung.OPTIMAL, FallbackRung.SOFT):
                continue
            assert a.objective == pytest.approx(b.objective, rel=1e-6, abs=1e-6)
            ref = reference_solve(fleet, inputs)
            if "re-solve" not in a.reason:
                assert a.objective == pytest.approx(ref.objective, rel=1e-4, abs=1e-6)
            compared += 1
    assert compared >= 15


def test_horizon_step_resolve_matches_a_fresh_solve() -> None:
    """After the horizon moved on a step (primal simplex from the old basis): same optimum."""
    rng = np.random.default_rng(13)
    fleet = random_fleet(rng, 2)
    step_s = 900.0
    hot = Dispatcher(fleet, 48, step_s=step_s)
    base = random_inputs(rng, fleet, 48, step_s=step_s)
    for k in range(4):
        inputs = dataclasses.replace(
            base,
            time=T0 + step_s * k,
            load_w=list(np.roll(base.load_w, -k)),
            import_price=list(np.roll(base.import_price, -k)),
        )
        plan = hot.solve(inputs, budget_s=10.0, last_plan=None)
        fresh = Dispatcher(fleet, 48, step_s=step_s).solve(inputs, budget_s=10.0, last_plan=None)
        assert plan.objective == pytest.approx(fresh.objective, rel=1e-6, abs=1e-6)


def test_a_parameter_in_the_matrix_is_refused_and_solved_through_cvxpy() -> None:
    """Not affine in costs/bounds/right-hand sides: no maps; the hot start then asks cvxpy."""
    x = cp.Variable(3, name="x", nonneg=True)
    scale = cp.Parameter(3, name="scale", nonneg=True)
    cap = cp.Parameter(name="cap")
    problem = cp.Problem(cp.Maximize(cp.sum(x)), [cp.multiply(scale, x) <= cap])
    scale.value = np.array([1.0, 2.0, 4.0])
    cap.value = 2.0
    assert problem.is_dpp()
    with pytest.raises(NotAffineError, match="matrix"):
        LpMaps(problem)
    hot = HighsHotStart(problem, {}, maps=None)
    assert not hot.fast
    assert hot.solve(5.0) == cp.OPTIMAL
    assert hot.objective_value == pytest.approx(2.0 + 1.0 + 0.5)
    scale.value = np.array([2.0, 2.0, 2.0])
    assert hot.solve(5.0) == cp.OPTIMAL
    np.testing.assert_allclose(np.sum(x.value), 3.0, rtol=1e-9)


def test_maps_keep_the_callers_parameter_values() -> None:
    """Deriving the maps checks them on random values, then puts the caller's values back."""
    fleet = random_fleet(np.random.default_rng(14), 1)
    problem = Dispatcher(fleet, 8).problem()
    before = {p.name(): np.array(p.value, copy=True) for p in problem.parameters()}
    LpMaps(problem)
    for p in problem.parameters():
        np.testing.assert_array_equal(p.value, before[p.name()])


def _boundary_run(prepare: bool) -> tuple[list[float], list[int], int]:
    """A 3 x 96 site re-solved every 5 minutes for 8 steps (the same inputs with and without
    solving each next step ahead): objectives, the boundary solves' simplex iterations and how
    many look-aheads kept a basis."""
    rng = np.random.default_rng(21)
    fleet = random_fleet(rng, 3)
    step_s = 900.0
    dispatcher = Dispatcher(fleet, 96, step_s=step_s)
    base = random_inputs(rng, fleet, 96, step_s=step_s)
    noise = np.random.default_rng(22)
    objectives: list[float] = []
    iterations: list[int] = []
    kept = 0
    plan = None
    inputs = base
    for cycle in range(24):
        k, within = divmod(cycle, 3)
        inputs = dataclasses.replace(
            base,
            time=T0 + step_s * k + 300.0 * within,
            load_w=list(np.roll(base.load_w, -k) * noise.uniform(0.97, 1.03, 96)),
            import_price=list(np.roll(base.import_price, -k)),
            export_price=list(np.roll(base.export_price, -k)),
        )
        plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=plan)
        assert plan.rung in (FallbackRung.OPTIMAL, FallbackRung.SOFT), plan.reason
        objectives.append(plan.objective)
        hot = dispatcher._model(step_s).hot
        assert hot is not None
        if within == 0 and k > 0:
            iterations.append(hot.last_iterations)
        if prepare and within == 2:
            ahead = ahead_inputs(inputs, plan)
            assert ahead is not None
            kept += dispatcher.prepare(ahead, budget_s=10.0)
    return objectives, iterations, kept


def test_solving_the_next_step_ahead_keeps_the_optimum_and_saves_the_boundary_work() -> None:
    """The basis found ahead for the next step's horizon: the same plans' objectives at every
    cycle, and each boundary solve needs fewer simplex iterations than primal simplex from
    the old basis (iterations: deterministic, unlike time)."""
    plain_obj, plain_it, none = _boundary_run(prepare=False)
    ahead_obj, ahead_it, kept = _boundary_run(prepare=True)
    assert none == 0
    assert kept == 8  # at the last cycle of every step
    np.testing.assert_allclose(ahead_obj, plain_obj, rtol=1e-6, atol=1e-6)
    assert len(ahead_it) == len(plain_it) == 7
    assert sum(ahead_it) < sum(plain_it) / 2, (ahead_it, plain_it)
    assert all(a <= p for a, p in zip(ahead_it, plain_it, strict=True)), (ahead_it, plain_it)


def test_a_look_ahead_for_another_step_is_not_used() -> None:
    """A basis kept for a step the horizon does not reach is dropped, and the solve is right."""
    rng = np.random.default_rng(23)
    fleet = random_fleet(rng, 2)
    dispatcher = Dispatcher(fleet, 48)
    inputs = random_inputs(rng, fleet, 48)
    plan = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
    far = ahead_inputs(dataclasses.replace(inputs, time=inputs.time + 5 * 900.0), plan)
    assert far is not None
    assert dispatcher.prepare(far, budget_s=10.0)
    moved = dataclasses.replace(inputs, time=inputs.time + 900.0)
    again = dispatcher.solve(moved, budget_s=10.0, last_plan=plan)
    fresh = Dispatcher(fleet, 48).solve(moved, budget_s=10.0, last_plan=None)
    assert again.objective == pytest.approx(fresh.objective, rel=1e-6, abs=1e-6)


def test_prepare_without_a_solve_or_with_bad_inputs_keeps_nothing() -> None:
    rng = np.random.default_rng(24)
    fleet = random_fleet(rng, 1)
    dispatcher = Dispatcher(fleet, 24)
    inputs = random_inputs(rng, fleet, 24)
    assert not dispatcher.prepare(inputs, budget_s=1.0)  # nothing to start from yet
    dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
    bad = dataclasses.replace(inputs, load_w=[float("nan")] * 24)
    assert not dispatcher.prepare(bad, budget_s=1.0)  # never raises
    assert not Dispatcher(fleet, 24, hot_start=False).prepare(inputs, budget_s=1.0)


def test_inputs_checked_by_validate_are_not_checked_again_by_their_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cycle validates its inputs before it hands them to the solve (a worker thread):
    the solve takes those very inputs' arrays; any other inputs it checks itself."""
    rng = np.random.default_rng(25)
    fleet = random_fleet(rng, 2)
    dispatcher = Dispatcher(fleet, 24)
    inputs = random_inputs(rng, fleet, 24)
    calls: list[int] = []
    real = essd.dispatch.inputs.validate_inputs

    def counted(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(essd.dispatch.inputs, "validate_inputs", counted)
    monkeypatch.setattr(essd.dispatch.dispatcher, "validate_inputs", counted)
    dispatcher.validate(inputs)
    checked = dispatcher.solve(inputs, budget_s=10.0, last_plan=None)
    assert len(calls) == 1
    assert checked.objective == pytest.approx(
        Dispatcher(fleet, 24).solve(inputs, budget_s=10.0, last_plan=None).objective, rel=1e-9
    )
    # Equal but other inputs, and bad ones after good ones were validated: checked again.
    dispatcher.solve(dataclasses.replace(inputs), budget_s=10.0, last_plan=None)
    assert len(calls) == 3
    bad = dataclasses.replace(inputs, load_w=[float("nan")] * 24)
    with pytest.raises(ValueError, match="load_w"):
        dispatcher.solve(bad, budget_s=10.0, last_plan=None)
