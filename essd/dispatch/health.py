"""How the optimizer's last solve went and whether its solver still works (metrics, alerts),
and the reason a solved plan gives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SolveTiming:
    """Where the last solve's time went, seconds: total, inside the solver, solves run."""

    total_s: float
    solver_s: float
    solves: int


@dataclass(frozen=True, slots=True)
class SolverHealth:
    """Whether the optimizer's solver still works, for metrics and alerts.

    A solve *fails* when it ends without a plan for any reason other than running out of its
    time budget: a non-optimal solver status (infeasible, error, a limit hit long before the
    budget was used) or an exception. A budget overrun neither counts as a failure nor ends
    a streak (a large site may need a few cycles of a short budget to converge); a solve that
    returns an optimized plan (rung 1 or 2) ends it.

    - ``solver_failures_consecutive``: failed solves since the last successful one (a gauge;
      0 when healthy).
    - ``solver_failures_total``: failed solves since the Dispatcher was built (a counter).
    - ``solver_rebuilds_total``: times the solver was thrown away and rebuilt cold because
      ``rebuild_after_failures`` solves in a row failed (a counter; see :class:`Dispatcher`).
    """

    solver_failures_consecutive: int = 0
    solver_failures_total: int = 0
    solver_rebuilds_total: int = 0


def solved_reason(slack: Mapping[str, float], fixed: int, overlap: bool) -> str:
    """A solved plan's reason: optimal or the soft constraints it violated (worst first), and
    the direction fixes it took."""
    if slack:
        # Worst first, at most three: the reason is a short line; the slack map has them all.
        worst = sorted(slack.items(), key=lambda kv: -kv[1])
        reason = "soft constraints violated: " + ", ".join(f"{k} by {v:.4g}" for k, v in worst[:3])
        if len(worst) > 3:
            reason += f" and {len(worst) - 3} more"
    else:
        reason = "optimal"
    notes = []
    if fixed:
        notes.append(f"{fixed} re-solve(s) to fix charge/discharge direction")
    if overlap:
        notes.append("remaining overlap applied as net power")
    return reason + (" (" + "; ".join(notes) + ")" if notes else "")
