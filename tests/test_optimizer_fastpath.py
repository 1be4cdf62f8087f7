"""The fast per-cycle path (essd.dispatch.lpmaps): the same LP and the same optimum as cvxpy."""

from __future__ import annotations

import dataclasses
from typing import Any

import cvxpy
import numpy as np
import pytest

from essd.dispatch import Dispatcher
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
