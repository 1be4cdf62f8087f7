"""Dispatch optimizer timing: first solve and re-solves, batteries x steps.

``build_ms`` is constructing the Dispatcher (cvxpy builds and compiles the problem once);
``first_solve_ms`` the first solve after it (cold: no simplex basis to start from yet). A re-solve
is what the daemon does every cycle: the same Dispatcher, new data. The cycles here run every 60 s
of simulated time against a daily load/PV/price profile: each cycle the SoC moves by the applied
setpoint and the load/PV forecast is redrawn (+-3 %), and when a cycle crosses a step boundary the
horizon moves on by one step (for 96 steps of 15 min one cycle in 15, for 288 steps of 5 min one in
5). ``resolve_ms`` is the median over the cycles, ``resolve_max_ms`` the slowest,
``resolve_step_shift_ms`` the median of the cycles where the horizon moved on a step. Before such a
cycle the daemon solves the next step's LP ahead, between cycles (essd.dispatch.Dispatcher.prepare,
from the last cycle's inputs moved on a step): so does this loop, outside the timed solve, and
``lookahead_ms`` is that solve's median; ``optimizer.no_lookahead.*`` is the same site without it.
``cvxpy_share`` is the fraction of re-solve time spent outside the solver (cvxpy's parameter
mapping, result unpacking and essd's own pre/post-processing); ``solver_ms`` is HiGHS itself.
``cvxpy_path_resolve_ms.10x288`` is the same kind of cycle solved through cvxpy's own HiGHS call (a
new HiGHS model per solve): the baseline of the hot start. ``speedup_vs_cvxpy_path`` is the plain
cvxpy re-solve's median time over the hot path's, the two solved back to back on the same inputs
every cycle (``interleaved_*_resolve_ms``; the hot path sets HiGHS's data from affine maps of the
parameters, essd.dispatch.lpmaps; the plain path is ``problem.solve``).

At 100 x 288 the headline figures (``optimizer.first_solve_ms.100x288`` ...) are the daemon's
default planning of a site of 100 *different* units (:func:`fleet`): identical units grouped
and ``control.aggregate_clusters = "auto"`` (essd.dispatch.aggregate: 10 groups of similar
units at 288 steps); ``optimizer.full_lp.*.100x288`` is the same site with every unit its own
columns in the LP, and ``optimizer.auto_loss_ratio.100x96`` /
``optimizer.cluster10_loss_ratio.100x96`` what grouping costs in plan value against it.
``optimizer.aggregated.*`` is a site of four unit models, identical units as one (exact).
``soak_failures.10000`` counts the plans that were not optimal (rung 1) in 10,000 re-solves of
one 1 x 96 Dispatcher with a 1 s budget, far more solver time in all than one budget: 0 unless
something wears out over a solver's life (HiGHS's run clock once stopped every solve from
about the 2,000th on).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Literal

import numpy as np

from benchmarks import Result
from essd.dispatch import BatterySpec, Dispatcher, DispatchInputs, ahead_inputs, validate_inputs
from essd.dispatch.simulate import plan_cost
from essd.domain import FallbackRung, LiveLimits, Plan

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
CYCLE_S = 60.0


def fleet(n: int) -> list[BatterySpec]:
    """``n`` different units: sizes, efficiencies, wear costs; every 10th is portable."""
    rng = np.random.default_rng(n)
    return [
        BatterySpec(
            id=f"bat{i:03d}",
            capacity_wh=float(rng.uniform(5e3, 50e3)),
            charge_efficiency=float(rng.uniform(0.92, 0.97)),
            discharge_efficiency=float(rng.uniform(0.92, 0.97)),
            degradation_cost_per_kwh=float(rng.uniform(0.01, 0.05)),
            can_discharge=i % 10 != 9,
        )
        for i in range(n)
    ]


def kinds(n: int) -> list[BatterySpec]:
    """``n`` units of four models (a site of identical containers), every 10th portable."""
    rng = np.random.default_rng(4)
    models = [
        BatterySpec(
            id=f"model{k}",
            capacity_wh=float(rng.uniform(5e3, 50e3)),
            charge_efficiency=float(rng.uniform(0.92, 0.97)),
            discharge_efficiency=float(rng.uniform(0.92, 0.97)),
            degradation_cost_per_kwh=float(rng.uniform(0.01, 0.05)),
        )
        for k in range(4)
    ]
    return [dataclasses.replace(models[i % 4], id=f"bat{i:03d}") for i in range(n)]


def _profile(t: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load W, PV W and import price per kWh at epoch times ``t`` (site of ``n`` units)."""
    hour = (t % 86400.0) / 3600.0
    load = 800.0 * n * (1.0 + 0.5 * np.sin(2 * np.pi * (hour - 8) / 24))
    pv = np.maximum(0.0, 2500.0 * n * np.sin(2 * np.pi * (hour - 6) / 24))
    price = 0.25 + 0.12 * np.sin(2 * np.pi * (hour - 13) / 24) + 0.03 * np.cos(hour * 1.7)
    return load, pv, price


def cycle_inputs(
    batteries: list[BatterySpec],
    *,
    steps: int,
    step_s: float,
    now: float,
    soc: dict[str, float],
    rng: np.random.Generator,
) -> DispatchInputs:
    """The inputs of the cycle at ``now``: horizon from the current step, fresh forecast."""
    n = len(batteries)
    start = now - (now % step_s)
    t = start + step_s * np.arange(steps)
    load, pv, price = _profile(t, n)
    return DispatchInputs(
        time=now,
        step_s=step_s,
        soc=soc,
        limits={b.id: LiveLimits(b.capacity_wh / 2, b.capacity_wh / 2) for b in batteries},
        reserve_soc={b.id: 0.1 for b in batteries},
        max_soc={b.id: 0.95 for b in batteries},
        load_w=(load * rng.uniform(0.97, 1.03, steps)).tolist(),
        pv_w=(pv * rng.uniform(0.97, 1.03, steps)).tolist(),
        import_price=price.tolist(),
        export_price=(0.6 * price - 0.02).tolist(),
        carbon_intensity=(0.3 + 0.1 * np.cos(2 * np.pi * t / 86400)).tolist(),
        carbon_price_per_kg=0.05,
        demand_charge_per_kw=8.0,
        peak_import_w=600.0 * n,
        import_limit_w=2000.0 * n,
        export_limit_w=1000.0 * n,
        terminal_value_per_kwh=0.15,
    )


def _advance(soc: dict[str, float], plan: Plan, step_s: float) -> dict[str, float]:
    """SoC after one cycle of the plan's first step (linear within the step)."""
    frac = CYCLE_S / step_s
    return {d: s + (plan.soc[d][1] - plan.soc[d][0]) * frac for d, s in soc.items()}


def measure(
    n: int,
    steps: int,
    cycles: int,
    *,
    hot_start: bool = True,
    solver: str = "HIGHS",
    aggregate: bool = False,
    clusters: int | Literal["auto"] | None = None,
    kinds_site: bool = False,
    label: str | None = None,
    lookahead: bool = True,
) -> list[Result]:
    """First solve and ``cycles`` re-solves of an ``n`` x ``steps`` site.

    The site is :func:`fleet` (different units), or :func:`kinds` (four unit models) with
    ``kinds_site``; ``aggregate`` / ``clusters`` as the Dispatcher takes them (the daemon's
    default is ``aggregate=True, clusters="auto"``). ``label``: the figures are named
    ``optimizer.<label>.*`` instead of ``optimizer.*``.
    """
    step_s = 86400.0 / steps
    batteries = kinds(n) if kinds_site else fleet(n)
    rng = np.random.default_rng(steps)
    soc = {b.id: float(rng.uniform(0.2, 0.8)) for b in batteries}
    started = time.perf_counter()
    dispatcher = Dispatcher(
        batteries,
        steps,
        step_s=step_s,
        hot_start=hot_start,
        solver=solver,
        aggregate=aggregate,
        clusters=clusters,
    )
    build_ms = (time.perf_counter() - started) * 1000.0
    now = T0 + 7 * 3600.0 + 30.0
    started = time.perf_counter()
    inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
    plan = dispatcher.solve(inputs, budget_s=120.0, last_plan=None)
    first_ms = (time.perf_counter() - started) * 1000.0
    totals: list[float] = []
    at_shift: list[float] = []
    in_solver: list[float] = []
    ahead_s: list[float] = []
    for _ in range(cycles):
        soc = _advance(soc, plan, step_s)
        shifted = (now + CYCLE_S) // step_s != now // step_s
        ahead = ahead_inputs(inputs, plan) if shifted and lookahead else None
        if ahead is not None and hot_start:
            started = time.perf_counter()
            dispatcher.prepare(ahead, budget_s=120.0)  # between cycles, as the daemon does
            ahead_s.append(time.perf_counter() - started)
        now += CYCLE_S
        inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
        started = time.perf_counter()
        plan = dispatcher.solve(inputs, budget_s=120.0, last_plan=plan)
        totals.append(time.perf_counter() - started)
        if shifted:
            at_shift.append(totals[-1])
        in_solver.append(dispatcher.last_timing.solver_s)
        if plan.rung.value > 2 or not math.isfinite(plan.objective):
            raise RuntimeError(f"benchmark solve fell back: {plan.reason}")
    size = f"{n}x{steps}"
    if label is not None:
        return [
            Result(f"optimizer.{label}.first_solve_ms.{size}", first_ms, "ms"),
            Result(f"optimizer.{label}.resolve_ms.{size}", _ms(totals), "ms"),
            Result(f"optimizer.{label}.resolve_max_ms.{size}", max(totals) * 1000.0, "ms"),
            Result(
                f"optimizer.{label}.resolve_step_shift_ms.{size}", _ms(at_shift or totals), "ms"
            ),
            *_lookahead(f"optimizer.{label}.lookahead_ms.{size}", ahead_s),
        ]
    if not hot_start or solver != "HIGHS":
        name = "cvxpy_path" if solver == "HIGHS" else f"cvxpy_path_{solver.lower()}"
        return [Result(f"optimizer.{name}_resolve_ms.{size}", _ms(totals), "ms")]
    return [
        Result(f"optimizer.build_ms.{size}", build_ms, "ms"),
        Result(f"optimizer.first_solve_ms.{size}", first_ms, "ms"),
        Result(f"optimizer.resolve_ms.{size}", _ms(totals), "ms"),
        Result(f"optimizer.resolve_max_ms.{size}", max(totals) * 1000.0, "ms"),
        Result(f"optimizer.resolve_step_shift_ms.{size}", _ms(at_shift or totals), "ms"),
        Result(f"optimizer.solver_ms.{size}", _ms(in_solver), "ms"),
        *_lookahead(f"optimizer.lookahead_ms.{size}", ahead_s),
        Result(f"optimizer.cvxpy_share.{size}", 1.0 - sum(in_solver) / sum(totals), "ratio"),
    ]


def speedup(n: int, steps: int, cycles: int) -> list[Result]:
    """Plain cvxpy re-solve time over the hot path's, the two solved back to back each cycle.

    Interleaved so that the load of a shared machine falls on both alike: separate runs a
    minute apart gave ratios from 3.5 to 22 here. Both see the same inputs; the SoC follows
    the hot path's plans.
    """
    step_s = 86400.0 / steps
    batteries = fleet(n)
    rng = np.random.default_rng(steps + 1)
    soc = {b.id: float(rng.uniform(0.2, 0.8)) for b in batteries}
    fast = Dispatcher(batteries, steps, step_s=step_s)
    plain = Dispatcher(batteries, steps, step_s=step_s, hot_start=False)
    now = T0 + 7 * 3600.0 + 30.0
    inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
    plan = fast.solve(inputs, budget_s=120.0, last_plan=None)
    plain.solve(inputs, budget_s=120.0, last_plan=None)
    times: dict[str, list[float]] = {"fast": [], "plain": []}
    for _ in range(cycles):
        soc = _advance(soc, plan, step_s)
        now += CYCLE_S
        inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
        for name, dispatcher in (("plain", plain), ("fast", fast)):
            started = time.perf_counter()
            result = dispatcher.solve(inputs, budget_s=120.0, last_plan=None)
            times[name].append(time.perf_counter() - started)
            if name == "fast":
                plan = result
    size = f"{n}x{steps}"
    ratio = statistics.median(times["plain"]) / statistics.median(times["fast"])
    return [
        Result(f"optimizer.speedup_vs_cvxpy_path.{size}", ratio, "ratio"),
        Result(f"optimizer.interleaved_resolve_ms.{size}", _ms(times["fast"]), "ms"),
        Result(f"optimizer.interleaved_cvxpy_path_resolve_ms.{size}", _ms(times["plain"]), "ms"),
    ]


def _plan_value(batteries: list[BatterySpec], inputs: DispatchInputs, plan: Plan) -> float:
    """What a plan costs over the horizon (energy, wear, demand) less its stored energy's value."""
    a = validate_inputs(batteries, len(inputs.load_w), inputs)
    power = np.array([plan.power_w[b.id] for b in batteries]) / 1000.0
    cost, _ = plan_cost(batteries, a, power)
    final = sum(plan.soc[b.id][-1] * b.capacity_wh / 1000.0 for b in batteries)
    return cost - a.terminal_value * final


def aggregate_loss(
    n: int = 20, steps: int = 96, cycles: int = 12, *, clusters: int | Literal["auto"] | None = None
) -> list[Result]:
    """Plan value lost by planning units as groups, against the full LP (same inputs).

    Without ``clusters``: a site of four unit models (identical units as one); with it: the
    site of different units (:func:`fleet`) as that many groups of similar ones. SoCs differ
    (drawn in 0.2..0.8), cycles an hour apart along the day; the loss is
    (grouped - full) / |full| of :func:`_plan_value`.
    """
    step_s = 86400.0 / steps
    batteries = fleet(n) if clusters else kinds(n)
    rng = np.random.default_rng(n)
    full = Dispatcher(batteries, steps, step_s=step_s)
    grouped = Dispatcher(batteries, steps, step_s=step_s, aggregate=not clusters, clusters=clusters)
    losses = []
    for k in range(cycles):
        soc = {b.id: float(rng.uniform(0.2, 0.8)) for b in batteries}
        now = T0 + 3600.0 * k
        inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
        best = _plan_value(batteries, inputs, full.solve(inputs, budget_s=60.0, last_plan=None))
        mine = _plan_value(batteries, inputs, grouped.solve(inputs, budget_s=60.0, last_plan=None))
        losses.append((mine - best) / abs(best))
    name = f"cluster{clusters}_loss_ratio" if clusters else "aggregate_loss_ratio"
    if clusters == "auto":
        name = "auto_loss_ratio"
    size = f"{n}x{steps}"
    return [
        Result(f"optimizer.{name}.{size}", statistics.median(losses), "ratio"),
        Result(f"optimizer.{name}_max.{size}", max(losses), "ratio"),
    ]


def soak(solves: int = 10_000, *, budget_s: float = 1.0) -> list[Result]:
    """Plans of ``solves`` re-solves of one 1 x 96 Dispatcher that were not rung 1."""
    steps = 96
    step_s = 86400.0 / steps
    batteries = fleet(1)
    rng = np.random.default_rng(10_000)
    dispatcher = Dispatcher(batteries, steps, step_s=step_s)
    now = T0
    plan: Plan | None = None
    failures = 0
    for _ in range(solves):
        # The SoC wanders across its window: every cycle is a rung-1 problem.
        soc = {b.id: float(rng.uniform(0.2, 0.8)) for b in batteries}
        inputs = cycle_inputs(batteries, steps=steps, step_s=step_s, now=now, soc=soc, rng=rng)
        plan = dispatcher.solve(inputs, budget_s=budget_s, last_plan=plan)
        failures += plan.rung is not FallbackRung.OPTIMAL
        now += CYCLE_S
    # Failures other than running out of the budget (a loaded machine can stall a solve past
    # 1 s): what the solver itself got wrong.
    solver_failures = float(dispatcher.health.solver_failures_total)
    return [
        Result(f"optimizer.soak_failures.{solves}", float(failures), "plans"),
        Result(f"optimizer.soak_solver_failures.{solves}", solver_failures, "solves"),
    ]


def _lookahead(name: str, seconds: list[float]) -> list[Result]:
    """The look-ahead solves' median, where the loop made any."""
    return [Result(name, _ms(seconds), "ms")] if seconds else []


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def run() -> list[Result]:
    """Every optimizer figure of ``make bench``."""
    results: list[Result] = []
    for n, steps, cycles in ((1, 96, 60), (10, 96, 30), (1, 288, 40), (10, 288, 20)):
        results += measure(n, steps, cycles)
    # A site of 100 different units as the daemon plans it by default (10 groups of similar
    # units at 288 steps), the same site as one full LP, and what grouping costs.
    results += measure(100, 288, 15, aggregate=True, clusters="auto")
    results += measure(
        100, 288, 15, aggregate=True, clusters="auto", lookahead=False, label="no_lookahead"
    )
    results += measure(10, 96, 30, lookahead=False, label="no_lookahead")
    results += measure(100, 288, 15, label="full_lp")
    results += aggregate_loss(100, 96, 4, clusters=10)
    results += aggregate_loss(100, 96, 4, clusters="auto")
    # A large site of identical units (four models), identical units planned as one, and what
    # that costs in plan value against the full LP.
    results += measure(100, 288, 15, aggregate=True, kinds_site=True, label="aggregated")
    results += aggregate_loss()
    # The same cycles through cvxpy's own HiGHS call (a fresh HiGHS model per solve): the
    # baseline the hot start is measured against (100 x 288 would take minutes this way).
    results += measure(10, 288, 10, hot_start=False)
    # The solver choice: the same cycles through cvxpy with each installed LP solver.
    for solver in ("HIGHS", "CLARABEL"):
        for n, steps in ((1, 96), (10, 96)):
            results += measure(n, steps, 10, hot_start=False, solver=solver)
    # The per-cycle path against plain cvxpy, interleaved cycle by cycle.
    results += speedup(1, 96, 60) + speedup(10, 96, 20)
    results += soak()
    return results
