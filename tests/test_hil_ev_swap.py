"""HIL "taxi swap station": a week of Poisson swaps; the service level holds at every check and
the cost is compared with charging each pack as soon as it is docked."""

from __future__ import annotations

from pathlib import Path

import pytest

from essd.hil.ev_report import compare_swap
from essd.hil.ev_scenario import load_ev_scenario
from essd.hil.swap_runner import run_swap

SCENARIO = Path(__file__).parent.parent / "profiles" / "scenarios" / "ev" / "taxi-swap-station.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("demand", ["series", "learned"])
def test_taxi_swap_station_holds_the_service_level_for_a_week(demand: str) -> None:
    sc = load_ev_scenario(SCENARIO)
    assert sc.swap is not None
    # The forecast is the scenario's hourly rates, or learned online from the swaps so far
    # (starting from a flat prior at the mean rate).
    sc = sc.model_copy(update={"swap": sc.swap.model_copy(update={"demand": demand})})
    opt = run_swap(sc, mode="optimized")
    asap = run_swap(sc, mode="asap")
    c = compare_swap(sc, opt, asap)
    assert not c.failures, c.failures
    assert opt.swaps == asap.swaps > 6 * 24  # the same taxis, a week of them
    assert opt.missed == 0
    assert opt.min_charged >= sc.swap.service_level
    assert opt.checks > opt.swaps  # every cycle start and after every swap
    assert opt.max_grid_w <= sc.site.import_limit_w * (1 + 1e-9)
    assert c.figures["cost_saving_ratio"] > 0.0
