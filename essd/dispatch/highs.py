"""The HiGHS hot start: the dispatch LP re-solved with one persistent HiGHS instance.

Solver and speed (figures from ``benchmarks/bench_optimizer.py`` on the 2-core dev machine):
HiGHS, chosen by measurement: through cvxpy a 10 x 96 re-solve took 24 ms with HiGHS and
50 ms with Clarabel (1 x 96: 6.4 vs 8.0 ms; ECOS is not installed). Parameters only enter
costs, bounds and right-hand sides, so the constraint matrix never changes and HiGHS is kept
between cycles and hot-started from its last basis (:class:`HighsHotStart`): the median
100 x 288 re-solve went from seconds (2.4-5 s cold through cvxpy) to ~0.3 s, 10 x 288 from
125 ms to 25 ms. Only the first solve, and re-solves where the horizon moves on a step, pay
for more simplex iterations.

The data of each re-solve come from :class:`essd.dispatch.lpmaps.LpMaps` rather than from
cvxpy's ``get_problem_data``: at 1 x 96 the re-solve went from 2.3 ms (86 % outside HiGHS)
to 0.8-1.0 ms, 4.7-8.5x faster than cvxpy's own ``solve`` on the same inputs (interleaved,
``optimizer.speedup_vs_cvxpy_path``; the loaded dev machine moves the ratio). cvxpygen was
not taken: its solver interfaces are OSQP, SCS, ECOS, Clarabel, QOCO and PDAQP
(cvxgrp/cvxpygen, cvxpygen/solvers/), not HiGHS, and the LP would lose the hot-started
simplex that keeps large sites fast.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import cvxpy
import highspy
import numpy as np
import numpy.typing as npt
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS as CVXPY_HIGHS

from essd.dispatch.lpmaps import LpData, LpMaps, highs_data

# cvxpy re-exports its atoms through star imports that mypy cannot follow; treat it as untyped.
cp: Any = cvxpy


FloatArray = npt.NDArray[np.float64]


_highspy: Any = highspy


def _silence_highs_banner() -> None:
    """HiGHS prints its copyright banner to stdout (fd 1) when the first instance of a process
    is built, whatever ``output_flag`` says later; under systemd that lands in the journal and
    in a terminal it breaks the view. Build that first instance with fd 1 on /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            _highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_silence_highs_banner()


# From this many LP columns on, a cold solve (no basis yet) runs HiGHS's interior point method.
_IPM_COLD_COLUMNS = 4_000


# HiGHS's simplex_strategy values: serial dual simplex (its default), primal simplex.
_DUAL_SIMPLEX = 1
_PRIMAL_SIMPLEX = 4


# HiGHS model status name -> cvxpy status, as cvxpy's own HiGHS interface maps them.
_HIGHS_STATUS: Mapping[str, str] = CVXPY_HIGHS.STATUS_MAP


class HighsHotStart:
    """Re-solves one parameterized cvxpy LP with a persistent HiGHS instance.

    The per-cycle path does not go through cvxpy: :class:`LpMaps` turns the parameters' values
    into HiGHS's costs, bounds and right-hand sides with a few sparse products, those vectors
    replace the previous ones in the live HiGHS model, and HiGHS starts from the previous
    optimal basis (a hot start). The constraint matrix never changes. A cycle's data differ
    little from the last one's, so that basis is nearly optimal: at 100 batteries x 288 steps a
    cold solve takes tens of thousands of simplex iterations, a re-solve hundreds. The primal
    solution is stored in the cvxpy variables (``value``) as cvxpy would store it.

    When the horizon has moved on (``solve(shift=k)``) the run starts from the basis that
    :meth:`prepare` found for the new horizon ahead of time (the last cycle of a step solves
    the next step's LP on a second HiGHS instance, off the cycle's path; the boundary cycle's
    LP then differs from it by one cycle's news): dual simplex from there. Without one it uses
    primal simplex from the old basis. Shifting the old basis by the steps moved was measured
    and is not done: the unshifted basis is the closer one (10 x 288: 106 column statuses
    differ from the new optimum's, 429 after a shift; 100 x 288: 3,271 iterations unshifted,
    3,854 shifted).

    Without ``maps`` (a problem whose parameters are not affine in costs, bounds and
    right-hand sides, see :class:`LpMaps`) it is solved the same way but with its data built
    by cvxpy every solve.
    """

    def __init__(
        self, problem: cp.Problem, options: Mapping[str, Any], *, maps: LpMaps | None = None
    ) -> None:
        self._problem = problem
        self._options = dict(options)
        self._maps = maps
        self._highs: Any = None
        self._a_data: FloatArray | None = None
        # The LP the HiGHS instance holds now (to pass on only what changed).
        self._lp_now: LpData | None = None
        self.last_solver_s = 0.0
        # Simplex iterations of the last run (deterministic, unlike its time).
        self.last_iterations = 0
        # HiGHS's model status name of the last run ("kOptimal", "kTimeLimit", ...).
        self.last_model_status = ""
        # The objective value of the last optimal solve (the cvxpy problem's value).
        self.objective_value = math.nan
        # The look-ahead instance (prepare) and the LP it holds; the basis it found for the
        # horizon starting at a step index.
        self._ahead_highs: Any = None
        self._ahead_lp: LpData | None = None
        self._ahead_basis: tuple[int, Any] | None = None
        self.last_prepare_s = 0.0

    @property
    def fast(self) -> bool:
        """True when the solver data come from the derived affine maps, not from cvxpy."""
        return self._maps is not None

    def reset(self) -> None:
        """Forget the HiGHS model (next solve starts cold)."""
        self._highs = None
        self._a_data = None
        self._lp_now = None
        self._ahead_highs = None
        self._ahead_lp = None
        self._ahead_basis = None

    def prepare(self, step_index: int, time_limit_s: float) -> bool:
        """Solve the LP of the parameters' current values, the horizon that starts at step
        ``step_index``, on the look-ahead instance from the live instance's basis, and keep
        the optimal basis for the solve that reaches that step (``solve(step_index=...)``).

        Only on the fast path with a live basis; True when a basis was kept. The live
        instance, its LP and the cvxpy variables are left as they were.
        """
        if self._maps is None or self._highs is None or self._lp_now is None:
            return False
        lp = self._maps.data(self._maps.theta())
        started = time.perf_counter()
        if self._ahead_highs is None or self._ahead_lp is None:
            self._ahead_highs = self._build(lp)
        else:
            _update(self._ahead_highs, self._ahead_lp, lp)
        self._ahead_lp = lp
        h = self._ahead_highs
        h.setBasis(self._highs.getBasis())
        h.setOptionValue("time_limit", float(h.getRunTime() + max(time_limit_s, 1e-3)))
        h.setOptionValue("simplex_strategy", _PRIMAL_SIMPLEX)
        try:
            h.run()
        finally:
            h.setOptionValue("simplex_strategy", _DUAL_SIMPLEX)
        self.last_prepare_s = time.perf_counter() - started
        if h.getModelStatus().name != "kOptimal":
            self._ahead_basis = None
            return False
        self._ahead_basis = (step_index, h.getBasis())
        return True

    def _new_highs(self, lp: LpData) -> Any:
        """The live HiGHS instance, built afresh to hold the LP."""
        h = self._build(lp)
        self._highs = h
        self._lp_now = lp
        self._a_data = lp.a_mat.data.copy()
        self._ahead_basis = None
        # Without a basis to start from, a large LP solves faster by interior point (with
        # crossover, which leaves the basis the next cycles hot-start from). Measured with
        # the LP that penalises every setpoint change (a churn column per unit and step):
        # 10 x 96 (4.3k columns) 0.14 s against 0.29 s of dual simplex, 10 x 288 (13k)
        # 1.35 s against 6.1 s, 30 x 96 0.78 s against 3.4 s; 1 x 288 (2.6k) 0.05 s against
        # 0.04 s. (Before that LP, simplex won up to ~30k columns.)
        if lp.a_mat.shape[1] >= _IPM_COLD_COLUMNS and "solver" not in self._options:
            h.setOptionValue("solver", "ipm")
        return h

    def _build(self, lp: LpData) -> Any:
        """A HiGHS instance holding the LP (one passModel, as cvxpy's own interface does)."""
        a_mat = lp.a_mat
        h = _highspy.Highs()
        h.setOptionValue("output_flag", False)
        # Devex pricing instead of dual steepest edge: no exact edge weights to rebuild on
        # every hot start; measured at 100 x 288: first solve 12.6 s instead of 18-23 s,
        # re-solve at a step boundary ~2.0 s instead of ~2.5-3.4 s, others unchanged.
        h.setOptionValue("simplex_dual_edge_weight_strategy", 1)
        for name, value in self._options.items():
            h.setOptionValue(name, value)
        model = _highspy.HighsLp()
        model.num_row_, model.num_col_ = a_mat.shape
        model.col_cost_ = lp.cost
        model.col_lower_, model.col_upper_ = lp.col_lo, lp.col_up
        model.row_lower_, model.row_upper_ = lp.row_lo, lp.row_up
        model.a_matrix_.format_ = _highspy.MatrixFormat.kColwise
        model.a_matrix_.start_ = a_mat.indptr
        model.a_matrix_.index_ = a_mat.indices
        model.a_matrix_.value_ = a_mat.data
        h.passModel(model)
        return h

    def _lp(self) -> tuple[LpData, Any]:
        """This solve's LP, and cvxpy's (chain, inverse data) when it came through cvxpy."""
        if self._maps is not None:
            return self._maps.data(self._maps.theta()), None
        data, chain, inverse = self._problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        return highs_data(data, inverse[-1]["offset"]), (chain, inverse)

    def solve(self, time_limit_s: float, *, shift: int = 0, step_index: int | None = None) -> str:
        """Solve with the parameters' current values; returns the cvxpy status.

        ``shift``: steps the horizon moved on since the last solve (> 0: from the basis
        :meth:`prepare` kept for ``step_index``, else primal simplex from the last basis).
        """
        lp, via_cvxpy = self._lp()
        same_matrix = self._a_data is not None and (
            self._maps is not None or np.array_equal(self._a_data, lp.a_mat.data)
        )
        ahead = self._ahead_basis
        self._ahead_basis = None
        if self._highs is None or not same_matrix or self._lp_now is None:
            h = self._new_highs(lp)
        else:
            h = self._highs
            _update(h, self._lp_now, lp)
            self._lp_now = lp
            if shift > 0 and ahead is not None and ahead[0] == step_index:
                h.setBasis(ahead[1])
                shift = 0  # a basis for this horizon: dual simplex, as between steps
        # HiGHS checks time_limit against the instance's run clock, which adds up every run()
        # so far (ERGO-Code/HiGHS#1331, #1477; highspy 1.16 has no zeroAllClocks): a plain
        # time_limit = budget failed every solve from the 2,105th on (4 x 96, budget 2 s).
        # So the limit is this run's budget on top of the clock's reading (as HiGHS.jl does).
        h.setOptionValue("time_limit", float(h.getRunTime() + max(time_limit_s, 1e-3)))
        # After the horizon moved on, every price and forecast value sits one step earlier:
        # primal simplex gets there in fewer iterations than dual (measured at 100 x 288:
        # ~900 instead of ~3,300 iterations; 10 x 288 with the LP that penalises every
        # setpoint change, runs A-B-A-B of 30 cycles: shift re-solves 546-794 ms against
        # 1,008-1,080 ms, the other re-solves unchanged), while dual stays faster for the
        # small changes between steps.
        primal = shift > 0 and "simplex_strategy" not in self._options and same_matrix
        if primal:
            h.setOptionValue("simplex_strategy", _PRIMAL_SIMPLEX)
        started = time.perf_counter()
        try:
            h.run()
        finally:
            if primal:
                h.setOptionValue("simplex_strategy", _DUAL_SIMPLEX)
        self.last_solver_s = time.perf_counter() - started
        self.last_iterations = int(h.getInfo().simplex_iteration_count)
        if "solver" not in self._options:
            # Re-solves go on from a basis: simplex. Also after a cold IPM run cut short by the
            # time limit: IPM cannot resume, while simplex progress carries over to the next
            # cycle, so a too-short budget still converges.
            h.setOptionValue("solver", "simplex")
        status = h.getModelStatus()
        self.last_model_status = str(status.name)
        if status.name != "kOptimal":
            # A run stopped by the time limit leaves a valid simplex basis: the next cycle goes
            # on from it (so a too-short budget still converges over a few cycles). After an
            # error the basis cannot be trusted: start cold next time.
            if status.name not in ("kTimeLimit", "kIterationLimit"):
                self.reset()
            self.objective_value = math.nan
            return str(_HIGHS_STATUS.get(status.name, cp.SOLVER_ERROR))
        solution = h.getSolution()
        if via_cvxpy is None:
            assert self._maps is not None
            x = np.asarray(solution.col_value, dtype=np.float64)
            self._maps.unpack(x)
            self.objective_value = float(lp.cost @ x) + lp.offset
            return str(cp.OPTIMAL)
        chain, inverse = via_cvxpy
        results: dict[str, Any] = {
            "solution": solution,
            "basis": h.getBasis(),
            "info": h.getInfo(),
            "model_status": status.name,
            "run_time": self.last_solver_s,
        }
        self._problem.unpack_results(results, chain, inverse)
        self.objective_value = float(self._problem.value)
        return str(self._problem.status)


def _update(h: Any, old: LpData, lp: LpData) -> None:
    """Replace the costs and bounds of ``lp`` that differ from ``old``, which ``h`` holds (one
    call each)."""
    cost = np.flatnonzero(old.cost != lp.cost)
    if cost.size:
        h.changeColsCost(cost.size, cost.astype(np.int32), lp.cost[cost])
    cols = np.flatnonzero((old.col_lo != lp.col_lo) | (old.col_up != lp.col_up))
    if cols.size:
        h.changeColsBounds(cols.size, cols.astype(np.int32), lp.col_lo[cols], lp.col_up[cols])
    rows = np.flatnonzero((old.row_lo != lp.row_lo) | (old.row_up != lp.row_up))
    if rows.size:
        h.changeRowsBounds(rows.size, rows.astype(np.int32), lp.row_lo[rows], lp.row_up[rows])
