"""The dispatch LP's solver data as affine maps of its parameters, derived once from cvxpy.

cvxpy compiles a DPP problem once into a parametrized cone program (``ParamConeProg``): sparse
tensors that, multiplied by the vector of all parameter values (with a trailing 1), give the
solver's cost vector, constraint matrix with right-hand side and variable bounds. Its own
per-solve path rebuilds the whole problem data through that chain (measured 86 % of a
1 x 96 re-solve). Where the parameters enter only costs, right-hand sides and bounds, which is
how :mod:`essd.dispatch.model` is written, the constraint matrix is a constant and each of the
rest is a sparse matrix times the parameter vector: :class:`LpMaps` cuts those matrices out of
cvxpy's tensors once and then maps a cycle's parameter values to HiGHS's data with four sparse
products. Nothing here knows the dispatch model: any DPP LP whose matrix does not depend on
its parameters works, and anything else is refused (:class:`NotAffineError`) so the caller
can go through cvxpy instead.

At build time the maps are checked against cvxpy's own ``get_problem_data`` for the current
parameter values, so a change in cvxpy's internal layout shows up as a refusal, never as a
wrong LP (tests compare both paths on random instances as well).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cvxpy
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

# cvxpy re-exports its atoms through star imports that mypy cannot follow; treat it as untyped.
cp: Any = cvxpy


FloatArray = npt.NDArray[np.float64]


# cvxpy's parameter id of the constant column (cvxpy.lin_ops.lin_op.CONSTANT_ID).
_CONSTANT_ID = -1


class NotAffineError(Exception):
    """The problem's solver data are not affine maps of its parameters in the expected form."""


def set_parameter(param: Any, value: Any) -> None:
    """Give a cvxpy parameter a value already validated by the caller (shape checked here).

    cvxpy's ``value`` setter checks the value against the parameter's attributes with
    ``np.isclose`` projections: measured at 1 x 96 that was ~40 % of a whole re-solve for the
    15 parameters of the dispatch LP. Only for parameters without sign or structure
    attributes, whose values essd validated before.
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != param.shape:
        raise ValueError(f"parameter {param.name()}: shape {arr.shape}, expected {param.shape}")
    param.save_value(arr)


@dataclass(frozen=True, slots=True)
class LpData:
    """One LP in HiGHS's form: min c'x + offset, row_lo <= A x <= row_up, col_lo <= x <= col_up."""

    a_mat: Any  # scipy CSC, rows x cols
    cost: FloatArray
    offset: float
    col_lo: FloatArray
    col_up: FloatArray
    row_lo: FloatArray
    row_up: FloatArray


def highs_data(data: dict[str, Any], offset: float) -> LpData:
    """The LP in HiGHS's form from cvxpy's ``get_problem_data(cp.HIGHS)`` dictionary.

    cvxpy's conic form is ``A x + s = b`` with ``s`` in the zero cone (the first
    ``dims.zero`` rows) or the nonnegative orthant (the rest), i.e. ``A x == b`` / ``A x <= b``.
    """
    a_mat = data["A"].tocsc()
    n_rows, n_cols = a_mat.shape
    n_eq = int(data["dims"].zero)
    row_up = np.asarray(data["b"], dtype=np.float64).reshape(n_rows)
    row_lo = row_up.copy()
    row_lo[n_eq:] = -np.inf
    lb = data.get("lower_bounds")
    ub = data.get("upper_bounds")
    col_lo = np.full(n_cols, -np.inf) if lb is None else np.asarray(lb, dtype=np.float64)
    col_up = np.full(n_cols, np.inf) if ub is None else np.asarray(ub, dtype=np.float64)
    cost = np.asarray(data["c"], dtype=np.float64)
    return LpData(a_mat, cost, float(offset), col_lo, col_up, row_lo, row_up)


class LpMaps:
    """The affine maps from a DPP LP's parameter values to its HiGHS data, and back to values.

    ``data(theta)`` gives the LP for the current parameter values, ``unpack(x)`` stores a
    primal solution in the cvxpy variables (their ``value``), ``objective(x)`` is the
    problem's objective value for ``x``. Raises NotAffineError from the constructor when the
    problem does not have that form (a parameter in the matrix, variables cvxpy replaced).
    """

    def __init__(self, problem: Any) -> None:
        for param in problem.parameters():
            if param.value is None:
                param.value = np.zeros(param.shape)
        data, _chain, inverse = problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        pp = data["param_prob"]
        if pp.P is not None or data.get("bool_vars_idx") or data.get("int_vars_idx"):
            raise NotAffineError("not a continuous LP")
        reference = highs_data(data, inverse[-1]["offset"])
        n_rows, n_cols = reference.a_mat.shape
        n_theta = int(pp.total_param_size) + 1
        if pp.param_id_to_col.get(_CONSTANT_ID) != n_theta - 1:
            raise NotAffineError("the constant is not the last parameter column")
        # Rows of the tensor: the entries of [A | b] (rows x cols + 1) in column-major order,
        # so b is the last block of ``n_rows``. It has billions of rows at 100 x 288: kept
        # as coordinates, never compressed by row.
        tensor = sp.coo_array(pp.A)
        if tensor.shape != (n_rows * (n_cols + 1), n_theta):
            raise NotAffineError(f"unexpected matrix tensor shape {tensor.shape}")
        in_rhs = tensor.row >= n_rows * n_cols
        if np.any(~in_rhs & (tensor.col != n_theta - 1) & (tensor.data != 0)):
            raise NotAffineError("a parameter enters the constraint matrix")
        rhs = sp.csr_array(
            (tensor.data[in_rhs], (tensor.row[in_rhs] - n_rows * n_cols, tensor.col[in_rhs])),
            shape=(n_rows, n_theta),
        )
        q = sp.csr_array(pp.q)
        self._cost = q[:n_cols]
        self._offset = np.asarray(q[[n_cols]].toarray()).reshape(n_theta)
        self._rhs = rhs
        self._col_lo = self._bounds(pp.lb_tensor, pp.lower_bounds, n_cols, n_theta, -np.inf)
        self._col_up = self._bounds(pp.ub_tensor, pp.upper_bounds, n_cols, n_theta, np.inf)
        self.a_mat = reference.a_mat
        self.n_eq = int(data["dims"].zero)
        self._row_lo = np.full(n_rows, -np.inf)
        # The parameters as cvxpy orders them: the problem's own objects, whose values are set.
        own = {p.id: p for p in problem.parameters()}
        self._params: list[tuple[Any, int, int]] = []
        for pid, col in pp.param_id_to_col.items():
            if pid == _CONSTANT_ID:
                continue
            if pid not in own:
                raise NotAffineError("cvxpy replaced a parameter")
            self._params.append((own[pid], int(col), int(own[pid].size)))
        variables = {v.id: v for v in problem.variables()}
        if set(variables) != set(pp.var_id_to_col) or pp.x.size != n_cols:
            raise NotAffineError("cvxpy replaced a variable")
        self._vars = sorted(
            ((variables[vid], int(col)) for vid, col in pp.var_id_to_col.items()),
            key=lambda vc: vc[1],
        )
        self._check(problem)

    @staticmethod
    def _bounds(
        tensor: Any, const: Any, n_cols: int, n_theta: int, default: float
    ) -> Callable[[FloatArray], FloatArray]:
        if tensor is not None:
            mat = sp.csr_array(tensor)
            if mat.shape != (n_cols, n_theta):
                raise NotAffineError(f"unexpected bound tensor shape {mat.shape}")
            return lambda theta: np.asarray(mat @ theta, dtype=np.float64)
        fixed = np.full(n_cols, default) if const is None else np.asarray(const, dtype=np.float64)
        return lambda theta: fixed

    def theta(self) -> FloatArray:
        """The parameter vector of the current parameter values (cvxpy's order, then 1)."""
        n = self._offset.size
        theta = np.empty(n)
        for param, col, size in self._params:
            theta[col : col + size] = np.ravel(param.value, order="F")
        theta[n - 1] = 1.0
        return theta

    def data(self, theta: FloatArray) -> LpData:
        """The LP for parameter vector ``theta``."""
        rhs = np.asarray(self._rhs @ theta, dtype=np.float64)
        row_lo = self._row_lo.copy()
        row_lo[: self.n_eq] = rhs[: self.n_eq]
        return LpData(
            a_mat=self.a_mat,
            cost=np.asarray(self._cost @ theta, dtype=np.float64),
            offset=float(self._offset @ theta),
            col_lo=self._col_lo(theta),
            col_up=self._col_up(theta),
            row_lo=row_lo,
            row_up=rhs,
        )

    def unpack(self, x: FloatArray) -> None:
        """Store the primal solution ``x`` (HiGHS's column order) in the cvxpy variables."""
        for var, col in self._vars:
            var.save_value(np.reshape(x[col : col + var.size], var.shape, order="F"))

    def _check(self, problem: Any) -> None:
        """Refuse if the maps do not reproduce cvxpy's data, for random parameter values.

        The parameters get values drawn in [0.5, 1.5] (negated where a sign attribute refuses
        them) for the check and their own values back afterwards.
        """
        rng = np.random.default_rng(0)
        saved = [(p, p.value) for p in problem.parameters()]
        try:
            for param, _value in saved:
                draw = rng.uniform(0.5, 1.5, param.shape)
                try:
                    param.value = draw
                except ValueError:
                    param.value = -draw
            data, _chain, inverse = problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
            reference = highs_data(data, inverse[-1]["offset"])
            mine = self.data(self.theta())
        finally:
            for param, value in saved:
                param.value = value
        if (reference.a_mat != self.a_mat).nnz:
            raise NotAffineError("the constraint matrix depends on the parameters")
        for name in ("cost", "col_lo", "col_up", "row_lo", "row_up"):
            a, b = getattr(mine, name), getattr(reference, name)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-12, atol=1e-12):
                raise NotAffineError(f"the derived {name} differs from cvxpy's")
        if not np.isclose(mine.offset, reference.offset, rtol=1e-12, atol=1e-12):
            raise NotAffineError("the derived objective offset differs from cvxpy's")
