"""The HiGHS hot start: the dispatch LP re-solved with one persistent HiGHS instance.

Solver and speed (figures from ``benchmarks/bench_optimizer.py`` on the 2-core dev machine):
HiGHS, chosen by measurement: through cvxpy a 10 x 96 re-solve took 24 ms with HiGHS and
50 ms with Clarabel (1 x 96: 6.4 vs 8.0 ms; ECOS is not installed). Parameters only enter
costs, bounds and right-hand sides, so the constraint matrix never changes and HiGHS is kept
between cycles and hot-started from its last basis (:class:`HighsHotStart`): the median
100 x 288 re-solve went from seconds (2.4-5 s cold through cvxpy) to ~0.3 s, 10 x 288 from
125 ms to 25 ms. Only the first solve, and re-solves where the horizon moves on a step, pay
for more simplex iterations.
"""

from __future__ import annotations

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

__all__ = ["HighsHotStart"]


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
_IPM_COLD_COLUMNS = 30_000


# HiGHS model status name -> cvxpy status, as cvxpy's own HiGHS interface maps them.
_HIGHS_STATUS: Mapping[str, str] = CVXPY_HIGHS.STATUS_MAP


class HighsHotStart:
    """Re-solves one parameterized cvxpy LP with a persistent HiGHS instance.

    cvxpy maps the parameters to solver data (DPP: a sparse product, no recompilation), but its
    HiGHS interface builds a fresh ``highspy.Highs`` per solve, so every cycle starts simplex
    from scratch. In this LP the parameters only enter costs, bounds and right-hand sides: the
    constraint matrix is fixed, so the previous HiGHS model is kept and only those vectors are
    replaced; HiGHS then starts from the previous optimal basis (a hot start). A cycle's data
    differs little from the last one's, so that basis is nearly optimal: at 100 batteries x
    288 steps a cold solve takes tens of thousands of simplex iterations, a re-solve hundreds.
    The result goes back through cvxpy (``unpack_results``) so variables read as usual.
    """

    def __init__(self, problem: cp.Problem, options: Mapping[str, Any]) -> None:
        self._problem = problem
        self._options = dict(options)
        self._highs: Any = None
        self._a_data: FloatArray | None = None
        self.last_solver_s = 0.0
        # HiGHS's model status name of the last run ("kOptimal", "kTimeLimit", ...).
        self.last_model_status = ""

    def reset(self) -> None:
        """Forget the HiGHS model (next solve starts cold)."""
        self._highs = None
        self._a_data = None

    def _new_highs(
        self,
        a_mat: Any,
        cost: FloatArray,
        col_bounds: tuple[FloatArray, FloatArray],
        row_bounds: tuple[FloatArray, FloatArray],
    ) -> Any:
        """A HiGHS instance holding the LP (one passModel, as cvxpy's own interface does)."""
        h = _highspy.Highs()
        h.setOptionValue("output_flag", False)
        # Devex pricing instead of dual steepest edge: no exact edge weights to rebuild on
        # every hot start; measured at 100 x 288: first solve 12.6 s instead of 18-23 s,
        # re-solve at a step boundary ~2.0 s instead of ~2.5-3.4 s, others unchanged.
        h.setOptionValue("simplex_dual_edge_weight_strategy", 1)
        for name, value in self._options.items():
            h.setOptionValue(name, value)
        lp = _highspy.HighsLp()
        lp.num_row_, lp.num_col_ = a_mat.shape
        lp.col_cost_ = cost
        lp.col_lower_, lp.col_upper_ = col_bounds
        lp.row_lower_, lp.row_upper_ = row_bounds
        lp.a_matrix_.format_ = _highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = a_mat.indptr
        lp.a_matrix_.index_ = a_mat.indices
        lp.a_matrix_.value_ = a_mat.data
        h.passModel(lp)
        self._highs = h
        self._a_data = a_mat.data.copy()
        # Without a basis to start from, a large LP solves faster by interior point (with
        # crossover, which leaves the basis the next cycles hot-start from): measured at
        # 100 x 288, 6.2-7.5 s against 12.6 s of dual simplex; below ~30k columns simplex wins.
        if a_mat.shape[1] >= _IPM_COLD_COLUMNS and "solver" not in self._options:
            h.setOptionValue("solver", "ipm")
        return h

    def solve(self, time_limit_s: float) -> str:
        """Solve with the parameters' current values; returns the cvxpy status."""
        data, chain, inverse = self._problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        a_mat = data["A"].tocsc()
        n_rows, n_cols = a_mat.shape
        n_eq = int(data["dims"].zero)
        row_up = np.asarray(data["b"], dtype=np.float64)
        row_lo = row_up.copy()
        row_lo[n_eq:] = -np.inf
        lb = data.get("lower_bounds")
        ub = data.get("upper_bounds")
        col_lo = np.full(n_cols, -np.inf) if lb is None else np.asarray(lb, dtype=np.float64)
        col_up = np.full(n_cols, np.inf) if ub is None else np.asarray(ub, dtype=np.float64)
        cost = np.asarray(data["c"], dtype=np.float64)
        same_matrix = self._a_data is not None and np.array_equal(self._a_data, a_mat.data)
        if self._highs is None or not same_matrix:
            h = self._new_highs(a_mat, cost, (col_lo, col_up), (row_lo, row_up))
        else:
            h = self._highs
            cols = np.arange(n_cols, dtype=np.int32)
            h.changeColsCost(n_cols, cols, cost)
            h.changeColsBounds(n_cols, cols, col_lo, col_up)
            h.changeRowsBounds(n_rows, np.arange(n_rows, dtype=np.int32), row_lo, row_up)
        # HiGHS checks time_limit against the instance's run clock, which adds up every run()
        # so far (ERGO-Code/HiGHS#1331, #1477; highspy 1.16 has no zeroAllClocks): a plain
        # time_limit = budget failed every solve from the 2,105th on (4 x 96, budget 2 s).
        # So the limit is this run's budget on top of the clock's reading (as HiGHS.jl does).
        h.setOptionValue("time_limit", float(h.getRunTime() + max(time_limit_s, 1e-3)))
        started = time.perf_counter()
        h.run()
        self.last_solver_s = time.perf_counter() - started
        if "solver" not in self._options:
            # Re-solves go on from a basis: simplex. Also after a cold IPM run cut short by the
            # time limit: IPM cannot resume, while simplex progress carries over to the next
            # cycle, so a too-short budget still converges.
            h.setOptionValue("solver", "simplex")
        status = h.getModelStatus()
        self.last_model_status = str(status.name)
        results: dict[str, Any] = {
            "solution": h.getSolution(),
            "basis": h.getBasis(),
            "info": h.getInfo(),
            "model_status": status.name,
            "run_time": self.last_solver_s,
        }
        if status.name != "kOptimal":
            # A run stopped by the time limit leaves a valid simplex basis: the next cycle goes
            # on from it (so a too-short budget still converges over a few cycles). After an
            # error the basis cannot be trusted: start cold next time.
            if status.name not in ("kTimeLimit", "kIterationLimit"):
                self.reset()
            return str(_HIGHS_STATUS.get(status.name, cp.SOLVER_ERROR))
        self._problem.unpack_results(results, chain, inverse)
        return str(self._problem.status)
