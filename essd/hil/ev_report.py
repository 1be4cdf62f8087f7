"""The EV and swap-station HIL comparison: KPIs of the optimized run against its baseline,
corrected for the change in stored energy, checked against the scenario's ``expect`` and
rendered as a Markdown report.

Correction: a run that ends with less energy stored (home battery, swap packs) than its
baseline has bought less; the difference is valued at the mean import price of the scenario
(divided by the charge efficiency) and added to its cost, so savings are never made by
emptying storage.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from essd.hil.ev_runner import ChargerRunResult
from essd.hil.ev_scenario import EvScenario
from essd.hil.swap_runner import SwapRunResult


@dataclass(frozen=True, slots=True)
class Comparison:
    """Figures of one scenario: name -> value, and the failed expectations (empty: passed)."""

    scenario: str
    baseline: str
    figures: dict[str, float]
    failures: tuple[str, ...]


def _stored_value(sc: EvScenario, wh: float, efficiency: float) -> float:
    return wh / 1000.0 / efficiency * statistics.mean(sc.site.import_price)


def compare_chargers(sc: EvScenario, opt: ChargerRunResult, now: ChargerRunResult) -> Comparison:
    """Optimized vs "now" for a charger scenario."""
    stored = _stored_value(sc, now.final_battery_wh - opt.final_battery_wh, 0.95)
    cost = opt.cost + stored
    short = [v for v in opt.vehicles if v.delivered_wh < v.requested_wh - 1.0]
    unmet = [v for v in short if v.published_shortfall_wh <= 0.0]
    figures = {
        "cost_optimized": cost,
        "cost_now": now.cost,
        "cost_saving_ratio": 1.0 - cost / now.cost if now.cost > 0 else 0.0,
        "storage_correction": stored,
        "self_use_optimized": opt.self_use,
        "self_use_now": now.self_use,
        "self_use_gain": opt.self_use - now.self_use,
        "max_grid_w_optimized": opt.max_grid_w,
        "max_grid_w_now": now.max_grid_w,
        "import_limit_w": sc.site.import_limit_w,
        "vehicles": len(opt.vehicles),
        "vehicles_short": len(short),
        "vehicles_short_unpublished": len(unmet),
        "profiles_rejected": opt.profiles_rejected,
    }
    failures = []
    e = sc.expect
    if "min_cost_saving_ratio" in e and figures["cost_saving_ratio"] < e["min_cost_saving_ratio"]:
        failures.append(f"cost saving {figures['cost_saving_ratio']:.3f} < expected")
    if "min_self_use_gain" in e and figures["self_use_gain"] < e["min_self_use_gain"]:
        failures.append(f"self-use gain {figures['self_use_gain']:.3f} < expected")
    if opt.max_grid_w > sc.site.import_limit_w * (1 + 1e-9):
        failures.append(f"import limit exceeded: {opt.max_grid_w:.0f} W")
    if unmet:
        failures.append(f"{len(unmet)} vehicle(s) short without a published shortfall")
    if "max_vehicles_short" in e and len(short) > e["max_vehicles_short"]:
        failures.append(f"{len(short)} vehicle(s) short")
    return Comparison(sc.name, "now", figures, tuple(failures))


def compare_swap(sc: EvScenario, opt: SwapRunResult, asap: SwapRunResult) -> Comparison:
    """Optimized vs charge-as-soon-as-docked for a swap station."""
    stored = _stored_value(sc, asap.final_stored_wh - opt.final_stored_wh, 0.95)
    cost = opt.cost + stored
    figures = {
        "cost_optimized": cost,
        "cost_asap": asap.cost,
        "cost_saving_ratio": 1.0 - cost / asap.cost if asap.cost > 0 else 0.0,
        "storage_correction": stored,
        "swaps": opt.swaps,
        "missed_swaps_optimized": opt.missed,
        "missed_swaps_asap": asap.missed,
        "min_charged_optimized": opt.min_charged,
        "min_charged_asap": asap.min_charged,
        "checks": opt.checks,
        "checks_below_level_optimized": opt.checks_below_level,
        "max_grid_w_optimized": opt.max_grid_w,
        "import_limit_w": sc.site.import_limit_w,
    }
    failures = []
    if opt.missed > sc.expect.get("max_missed_swaps", 0):
        failures.append(f"{opt.missed} missed swap(s)")
    if opt.checks_below_level > sc.expect.get("max_checks_below_level", 0):
        failures.append(f"service level broken at {opt.checks_below_level} check(s)")
    if opt.max_grid_w > sc.site.import_limit_w * (1 + 1e-9):
        failures.append(f"import limit exceeded: {opt.max_grid_w:.0f} W")
    return Comparison(sc.name, "asap", figures, tuple(failures))


def render(comparisons: list[Comparison]) -> str:
    """A Markdown report: one table per scenario."""
    lines = ["# EV and swap-station HIL report", ""]
    for c in comparisons:
        lines += [
            f"## {c.scenario} (baseline: {c.baseline})",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.4g} |" for k, v in c.figures.items()]
        verdict = "passed" if not c.failures else "FAILED: " + "; ".join(c.failures)
        lines += ["", f"Expectations: {verdict}", ""]
    return "\n".join(lines)
