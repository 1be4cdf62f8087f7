"""A scenario's expectations checked against the figures of its run, and the fault windows the
report shows. Battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from essd.hil.hostile import safe_after_s
from essd.hil.kpi import CycleRecord, Kpis, Sample
from essd.hil.scenario import Scenario
from hil_sim.faults import FaultSpec


def report_window(scenario: Scenario, i: int) -> tuple[float, float]:
    """Offsets (s) during which cycles are attributed to fault ``i``: its duration, or two
    cycles for an instant fault (a mode reset, a dropped connection)."""
    f = scenario.faults[i]
    return f.at, max(f.end, f.at + 2 * scenario.cycle_period)


def fault_summary(
    scenario: Scenario,
    cycles: Sequence[CycleRecord],
    unsafe: Sequence[str],
    samples: Sequence[Sample] = (),
    batteries: Sequence[str] = (),
) -> list[dict[str, Any]]:
    start = scenario.start_epoch
    out = []
    for i, f in enumerate(scenario.faults):
        label = f"{i}:{f.kind}:{f.device}"

        def concerned(c: CycleRecord, f: FaultSpec = f) -> list[str]:
            return sorted(c.setpoints_w) if f.kind == "meter_loss" else [f.device]

        during = [c for c in cycles if label in c.active_faults]
        after = [c for c in cycles if c.time >= start + report_window(scenario, i)[1]]
        states = sorted({c.device_states.get(f.device, "?") for c in during})
        recovered_at = next(
            (c.time - (start + f.end) for c in after if c.device_states.get(f.device) == "running"),
            None,
        )
        # Every unit is affected by a meter fault: the site limits rest on the meter.
        units = list(batteries) if f.device not in batteries else [f.device]
        window_end = start + report_window(scenario, i)[1]
        out.append(
            {
                "index": i,
                "kind": f.kind,
                "device": f.device,
                "at_s": f.at,
                "duration_s": f.duration,
                "cycles": len(during),
                "worst_rung": max((c.rung for c in during), default=0),
                "rungs": sorted({c.rung for c in during}),
                "device_states": states,
                "setpoint_sources": sorted(
                    {c.setpoint_sources.get(d, "-") for c in during for d in concerned(c)}
                ),
                # For a meter fault every unit is concerned: without the meter the site limits
                # cannot be verified, so all of them must idle.
                "setpoint_w_max": max(
                    (abs(c.setpoints_w.get(d, 0.0)) for c in during for d in concerned(c)),
                    default=0.0,
                ),
                "safe_idle_cycles": sum(
                    1
                    for c in during
                    if all(
                        c.setpoint_sources.get(d) == "safe" or c.setpoints_w.get(d, 0.0) == 0.0
                        for d in concerned(c)
                    )
                ),
                "unsafe_writes": [
                    u for u in unsafe if any(u.startswith(f"cycle {c.cycle}:") for c in during)
                ],
                "recovered_after_s": recovered_at,
                "safe_after_s": safe_after_s(samples, units, start + f.at, window_end),
                "reasons": sorted({c.reason for c in during})[:3],
            }
        )
    return out


def check_expectations(kpis: Kpis, scenario: Scenario) -> list[str]:
    """One line per expectation that failed, naming it (empty when all hold)."""
    e = scenario.expect
    fails = []
    if kpis.violations > e.max_violations:
        fails.append(
            f"max_violations: {kpis.violations} violations > {e.max_violations} "
            f"({dict(kpis.violations_by_kind)})"
        )
    if kpis.worst_rung > e.worst_rung:
        fails.append(f"worst_rung: rung {kpis.worst_rung} reached, at most {e.worst_rung} allowed")
    if e.max_cost_ratio is not None and (
        kpis.cost_ratio is None or kpis.cost_ratio > e.max_cost_ratio
    ):
        fails.append(f"max_cost_ratio: cost/baseline {kpis.cost_ratio} > {e.max_cost_ratio}")
    if e.min_savings is not None and kpis.savings < e.min_savings:
        fails.append(f"min_savings: saved {kpis.savings:.2f} < {e.min_savings}")
    if e.min_savings_vs_optimum is not None and (
        kpis.savings_vs_optimum is None or kpis.savings_vs_optimum < e.min_savings_vs_optimum
    ):
        fails.append(
            f"min_savings_vs_optimum: {kpis.savings_vs_optimum} of the perfect-foresight "
            f"savings < {e.min_savings_vs_optimum}"
        )
    if e.max_peak_import_w is not None and kpis.peak_import_w > e.max_peak_import_w:
        fails.append(
            f"max_peak_import_w: peak import {kpis.peak_import_w:.0f} W > {e.max_peak_import_w}"
        )
    if e.max_export_wh is not None and kpis.exported_wh > e.max_export_wh:
        fails.append(f"max_export_wh: exported {kpis.exported_wh:.0f} Wh > {e.max_export_wh}")
    if e.min_self_consumption is not None and (
        kpis.self_consumption_ratio is None or kpis.self_consumption_ratio < e.min_self_consumption
    ):
        fails.append(
            f"min_self_consumption: {kpis.self_consumption_ratio} < {e.min_self_consumption}"
        )
    if kpis.unsafe_writes > e.max_unsafe_writes:
        fails.append(f"max_unsafe_writes: {kpis.unsafe_writes} unsafe setpoints written")
    if e.min_rung_during_faults is not None:
        for f in kpis.faults:
            if f["worst_rung"] < e.min_rung_during_faults:
                fails.append(
                    f"min_rung_during_faults: fault {f['index']} ({f['kind']} on {f['device']}) "
                    f"left the ladder at rung {f['worst_rung']}"
                )
    return fails
