"""The fallback ladder, in one place.

The ladder of docs/architecture.md, from best to worst: 1 optimal solve, 2 soft-constraint solve
(both made by the optimizer), 3 the last valid plan shifted to now, 4 rule-based
self-consumption within limits, 5 safe idle. When the optimizer cannot deliver, or a phase
before it fails, the cycle (and the dispatcher itself) walks down from rung 3 with
:func:`descend`: each rung is tried only when the one above it is not available, and the last
one always is.

The cause that sent the cycle down is typed (:class:`essd.domain.PlanCause`); the plan's
``reason`` adds the detail for people. Which planner makes rungs 4 and 5 is injected, so this
module depends on the domain types only.

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from essd.domain import FallbackRung, Plan, PlanCause

log = logging.getLogger(__name__)

#: Causes of plans the optimizer made (rungs 1 and 2): only these are kept as "last plan".
SOLVED = frozenset({PlanCause.OPTIMAL, PlanCause.SOFT_CONSTRAINTS})

_SHIFTABLE = (FallbackRung.OPTIMAL, FallbackRung.SOFT, FallbackRung.LAST_PLAN)


def usable_last_plan(last_plan: Plan | None, device_ids: Collection[str]) -> bool:
    """True when ``last_plan`` was optimized for exactly these devices (rung 3 may use it)."""
    return (
        last_plan is not None
        and last_plan.rung in _SHIFTABLE
        and set(last_plan.device_ids) == set(device_ids)
        and last_plan.finite()
    )


def descend(
    *,
    now: float,
    cause: PlanCause,
    reason: str,
    device_ids: Collection[str],
    last_plan: Plan | None,
    rule_based: Callable[[], Plan] | None,
    safe_idle: Callable[[], Plan],
    allow_last_plan: bool = True,
) -> Plan:
    """Walk down from rung 3: the last plan shifted to ``now``, else rule-based, else idle.

    ``rule_based`` is None when its inputs are not usable (no valid meter, no forecast); it
    and ``safe_idle`` are called only when their rung is reached. A rule-based planner that
    raises, or returns non-finite setpoints, is skipped for safe idle: the last rung is always
    reachable. ``allow_last_plan`` is False when the present contradicts the old plan (its
    assumptions are known to be wrong, e.g. the forecast inputs were invalid).
    """
    if allow_last_plan and last_plan is not None and usable_last_plan(last_plan, device_ids):
        shifted = last_plan.shifted_to(
            now, rung=FallbackRung.LAST_PLAN, reason=f"{reason}; last plan shifted", cause=cause
        )
        if shifted is not None and shifted.steps > 0:
            return shifted
        reason = f"{reason}; last plan expired"
    elif last_plan is None:
        reason = f"{reason}; no last plan"
    if rule_based is not None:
        try:
            plan = rule_based()
        except Exception as exc:  # the last rung must stay reachable whatever the planner does
            log.debug("rule-based planner failed: %s", exc)
            reason = f"{reason}; rule-based planner failed: {exc}"
        else:
            if plan.finite():
                return plan.with_cause(
                    FallbackRung.RULE_BASED, cause, f"{reason}; rule-based self-consumption"
                )
            reason = f"{reason}; rule-based plan not finite"
    return safe_idle().with_cause(FallbackRung.SAFE_IDLE, cause, f"{reason}; safe idle")
