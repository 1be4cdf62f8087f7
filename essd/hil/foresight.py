"""The yardstick of a scenario run: its cost model and the same site solved offline with perfect
knowledge of the true series (the optimizer's own LP over the whole scenario).
Battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from essd.config import Settings
from essd.cycle import Controller
from essd.dispatch import Dispatcher, DispatchInputs
from essd.domain import LiveLimits
from essd.hil.kpi import CostModel, PriceTrace, grid_cost
from essd.hil.scenario import Scenario
from essd.hil.truth import ScenarioSeries
from hil_sim.truth import SiteTruth


def cost_model(scenario: Scenario, settings: Settings) -> CostModel:
    """The tariff terms the figures of ``scenario`` are costed with."""
    return CostModel(
        carbon_price_per_kg=settings.tariff.carbon_price_per_kg,
        demand_charge_per_kw=settings.tariff.demand_charge_per_kw,
        demand_window_s=settings.demand_window_s,
        export_limiter=scenario.site.export_limiter,
        export_limit_w=settings.site.grid_export_limit_w,
    )


def perfect_foresight(
    scenario: Scenario,
    *,
    controller: Controller,
    series: ScenarioSeries,
    first: SiteTruth,
    final_soc: Mapping[str, float],
    model: CostModel,
) -> tuple[float | None, str]:
    """Cost of the best dispatch knowing the true series, solved offline over the whole run.

    The optimizer's own LP over the scenario, from the true initial SoC, must end at least
    where the daemon ended (so stored energy is not counted as a saving); portable units are
    unavailable while unplugged. Faults other than unplugging are unknown to it: the optimum
    is an upper bound on what any controller could save.
    """
    if not controller.specs:
        return None, "no batteries"
    settings = controller.settings
    step = settings.control.step_s
    steps = max(1, math.ceil(scenario.duration / step))
    start = scenario.start_epoch
    times = [start + k * step for k in range(steps)]
    values = [series.at(t) for t in times]
    envs = {d.id: d.envelope for d in controller.batteries if d.envelope is not None}
    availability: dict[str, list[bool]] = {}
    for f in scenario.faults:
        if f.kind == "unplugged" and f.device in envs:
            row = availability.setdefault(f.device, [True] * steps)
            for k, t in enumerate(times):
                if start + f.at <= t < start + f.end or start + f.at < t + step <= start + f.end:
                    row[k] = False
    limiter = scenario.site.export_limiter
    inputs = DispatchInputs(
        time=start,
        step_s=step,
        soc={k: first.batteries[k].soc for k in envs},
        limits={k: LiveLimits(e.max_charge_w, e.max_discharge_w) for k, e in envs.items()},
        reserve_soc={k: min(e.reserve_soc, first.batteries[k].soc) for k, e in envs.items()},
        max_soc={k: max(e.max_soc, first.batteries[k].soc) for k, e in envs.items()},
        load_w=[v[0] for v in values],
        pv_w=[v[1] for v in values],
        import_price=[v[2] for v in values],
        export_price=[v[3] for v in values],
        availability=availability,
        carbon_intensity=[v[4] / 1000.0 for v in values],
        carbon_price_per_kg=model.carbon_price_per_kg,
        demand_charge_per_kw=model.demand_charge_per_kw,
        import_limit_w=settings.site.grid_import_limit_w,
        export_limit_w=math.inf if limiter else settings.site.grid_export_limit_w,
        terminal_soc={
            k: min(max(final_soc.get(k, e.reserve_soc), e.reserve_soc), e.max_soc)
            for k, e in envs.items()
        },
    )
    dispatcher = Dispatcher(
        controller.specs,
        steps,
        solver="HIGHS",
        step_s=step,
        change_cost_per_kw=0.0,
        terminal_shortfall_cost_per_kwh=100.0,
    )
    plan = dispatcher.solve(inputs, budget_s=60.0, last_plan=None)
    battery = np.zeros(steps)
    for dev in plan.device_ids:
        battery += np.asarray(plan.power_w[dev][:steps])
    grid = [v[0] - v[1] - b for v, b in zip(values, battery.tolist(), strict=True)]
    if limiter:
        grid = [
            max(g, -settings.site.grid_export_limit_w) if v[1] > 0 else g
            for g, v in zip(grid, values, strict=True)
        ]
    trace = PriceTrace(
        times=times,
        dt_s=[step] * steps,
        import_price=[v[2] for v in values],
        export_price=[v[3] for v in values],
        carbon_g_per_kwh=[v[4] for v in values],
    )
    cost = grid_cost(grid, trace, model)
    return cost.total, f"rung {int(plan.rung)}: {plan.reason}"
