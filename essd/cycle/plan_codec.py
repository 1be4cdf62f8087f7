"""The controller's durable data: plans and numbers as JSON-ready values, read back strictly.

Every reader raises ValueError naming the field when the data does not fit, so a damaged
state file is refused as a whole (see :mod:`essd.state`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from essd.domain import FallbackRung, Plan, PlanCause


def number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number, got {value!r}")
    return float(value)


def optional_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else number(data, key)


def obj(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"{key}: must be an object")
    return value


def plan_data(plan: Plan) -> dict[str, Any]:
    """A plan as JSON-ready data (a non-finite objective becomes null)."""
    return {
        "created_at": plan.created_at,
        "step_s": plan.step_s,
        "device_ids": list(plan.device_ids),
        "power_w": {d: list(v) for d, v in plan.power_w.items()},
        "soc": {d: list(v) for d, v in plan.soc.items()},
        "grid_w": list(plan.grid_w),
        "objective": plan.objective if math.isfinite(plan.objective) else None,
        "solver_status": plan.solver_status,
        "rung": int(plan.rung),
        "reason": plan.reason,
        "cause": plan.cause.value,
        "import_price": list(plan.import_price),
        "export_price": list(plan.export_price),
    }


def _floats(data: Mapping[str, Any], key: str) -> tuple[float, ...]:
    values = data.get(key)
    if not isinstance(values, list):
        raise ValueError(f"{key}: must be a list of numbers")
    out = tuple(float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool))
    if len(out) != len(values) or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{key}: must be a list of finite numbers")
    return out


def plan_from_data(data: Mapping[str, Any]) -> Plan:
    """The plan :func:`plan_data` gave; ValueError naming the field otherwise."""
    ids = data.get("device_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("last_plan.device_ids: must be a list of ids")
    power = obj(data, "power_w")
    soc = obj(data, "soc")
    grid = _floats(data, "grid_w")
    plan = Plan(
        created_at=number(data, "created_at"),
        step_s=number(data, "step_s"),
        device_ids=tuple(ids),
        power_w={d: _floats(power, d) for d in ids},
        soc={d: _floats(soc, d) for d in ids},
        grid_w=grid,
        objective=math.nan if data.get("objective") is None else number(data, "objective"),
        solver_status=str(data.get("solver_status", "")),
        rung=FallbackRung(int(number(data, "rung"))),
        reason=str(data.get("reason", "")),
        cause=PlanCause(str(data.get("cause"))),
        import_price=_floats(data, "import_price"),
        export_price=_floats(data, "export_price"),
    )
    if plan.step_s <= 0 or any(len(p) != len(grid) for p in plan.power_w.values()):
        raise ValueError("last_plan: steps do not match")
    return plan
