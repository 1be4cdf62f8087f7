"""Metric label values: the fixed sets, plan reasons mapped to categories, and a cap on the names
that arrive from outside (error kinds, command names), so a misbehaving peer cannot blow up
the number of series. Also the unit factors of the exported figures.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import get_args

from essd.commands import Mode
from essd.domain import Plan, PlanCause

JOULES_PER_WH = 3600.0


#: Phases of a cycle (docs/architecture.md); any other phase name is counted as "other".
CYCLE_PHASES = ("read", "snapshot", "forecast", "decide", "guard", "write", "publish")


#: cvxpy's status strings plus the two the fallback planners use; anything else is "other".
SOLVER_STATUSES = (
    "optimal",
    "optimal_inaccurate",
    "infeasible",
    "infeasible_inaccurate",
    "unbounded",
    "unbounded_inaccurate",
    "infeasible_or_unbounded",
    "user_limit",
    "solver_error",
    "rule_based",
    "idle",
    "other",
)


#: Why the plan in force was made: the values of the typed cause (essd.domain.PlanCause).
REASON_CATEGORIES = tuple(c.value for c in PlanCause)


#: Solver failures by cause (a fallback plan made because the optimizer did not deliver).
SOLVER_FAILURE_CAUSES = ("timeout", "status", "error")


CONTROL_MODES: tuple[str, ...] = get_args(Mode)


#: Operator commands of the MQTT contract (docs/mqtt.md); their counters exist from the start.
COMMANDS = ("mode", "reserve", "setpoint", "prices", "forecast")


_LABEL_VALUE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


# Kinds of failed requests the drivers count (drivers.modbus.ErrorKind) plus the daemon's
# whole-read deadline; other kinds are still exported, up to a bounded number of labels.
ERROR_KINDS = (
    "timeout",
    "connection",
    "backoff",
    "exception",
    "protocol",
    "readback_mismatch",
    "read_deadline",
)


class BoundedLabel:
    """Label values from a fixed set, plus at most ``extra`` new ones; the rest become "other".

    New values must look like identifiers (lower case, digits, ``_``, up to 32 characters),
    so nothing that arrives from the network can create series without bound.
    """

    def __init__(self, known: Iterable[str], *, extra: int) -> None:
        self._allowed = set(known)
        self._extra = extra
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """The label value to use for ``value``."""
        if value in self._allowed:
            return value
        with self._lock:
            if value in self._allowed:
                return value
            if self._extra > 0 and _LABEL_VALUE.match(value):
                self._extra -= 1
                self._allowed.add(value)
                return value
        return "other"


def reason_category(plan: Plan, mode: str = "auto") -> str:
    """The ``reason`` label of a plan: its typed cause (manual and standby by mode)."""
    if mode in ("manual", "standby"):
        return mode
    return plan.cause.value


_SOLVER_FAILURES = {
    PlanCause.SOLVER_TIMEOUT: "timeout",
    PlanCause.SOLVE_LATE: "timeout",
    PlanCause.SOLVE_BUSY: "timeout",
    PlanCause.SOLVER_STATUS: "status",
    PlanCause.SOLVER_ERROR: "error",
}


def solver_failure_cause(plan: Plan) -> str | None:
    """``timeout``, ``status`` or ``error`` when a fallback plan is in force because the solve
    failed that way; None when the optimizer's plan is in force or it failed for another reason.
    """
    return _SOLVER_FAILURES.get(plan.cause)
