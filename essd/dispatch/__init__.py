"""Receding-horizon dispatch: a parameterized cvxpy LP re-solved every cycle, and its fallbacks.

- :mod:`essd.dispatch.inputs`: batteries, per-cycle inputs and their validation;
- :mod:`essd.dispatch.model`: the LP (variables, constraints, objective; DPP, built once);
- :mod:`essd.dispatch.flex` / :mod:`essd.dispatch.sessions` / :mod:`essd.dispatch.swap`:
  EV sessions and swap packs as flexible-load columns (``FlexSpec``);
- :mod:`essd.dispatch.lpmaps`: the LP's HiGHS data as affine maps of its parameters (derived
  once from cvxpy's compiled problem, applied with numpy every cycle);
- :mod:`essd.dispatch.highs`: the persistent, hot-started HiGHS solve;
- :mod:`essd.dispatch.aggregate`: identical units as one battery in the LP, the plan shared;
- :mod:`essd.dispatch.simulate`: energy, grid and cost of a plan, and the Plan record;
- :mod:`essd.dispatch.planners`: rule-based self-consumption and safe idle (the lower rungs);
- :mod:`essd.dispatch.dispatcher`: the Dispatcher, which ties them together per cycle.

Sign conventions: battery power W > 0 discharges into the site, < 0 charges; grid power W > 0
imports. SoC is a ratio 0..1.
"""

from essd.dispatch.dispatcher import DEFAULT_SOLVER, Dispatcher
from essd.dispatch.flex import FlexSpec
from essd.dispatch.health import SolverHealth, SolveTiming
from essd.dispatch.inputs import (
    BatterySpec,
    DispatchInputs,
    InvalidDispatchInputsError,
    ahead_inputs,
    terminal_value,
    validate_inputs,
)
from essd.dispatch.planners import rule_based_plan, safe_idle_plan

__all__ = [
    "DEFAULT_SOLVER",
    "BatterySpec",
    "DispatchInputs",
    "Dispatcher",
    "FlexSpec",
    "InvalidDispatchInputsError",
    "SolveTiming",
    "SolverHealth",
    "ahead_inputs",
    "rule_based_plan",
    "safe_idle_plan",
    "terminal_value",
    "validate_inputs",
]
