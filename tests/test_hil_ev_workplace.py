"""HIL "workplace car park": 10 chargers (OCPP 1.6J and 2.0.1, W and A) under a 60 kW
connection; the limit is never exceeded, every departure is met or its shortfall published."""

from __future__ import annotations

from pathlib import Path

import pytest

from essd.hil.ev_report import compare_chargers
from essd.hil.ev_runner import run_chargers
from essd.hil.ev_scenario import load_ev_scenario

SCENARIO = (
    Path(__file__).parent.parent / "profiles" / "scenarios" / "ev" / "workplace-car-park.yaml"
)


@pytest.mark.slow
async def test_workplace_keeps_the_connection_limit_and_publishes_shortfalls() -> None:
    sc = load_ev_scenario(SCENARIO)
    opt = await run_chargers(sc, mode="optimized")
    now = await run_chargers(sc, mode="now")
    c = compare_chargers(sc, opt, now)
    assert not c.failures, c.failures
    limit = sc.site.import_limit_w
    assert opt.max_grid_w <= limit
    assert now.max_grid_w > limit, "without control the chargers would overload the connection"
    short = [v for v in opt.vehicles if v.delivered_wh < v.requested_wh - 1.0]
    # The 1.5 h visitor asking for 30 kWh cannot get it at 11 kW: published, nobody else short.
    assert [(v.charger, v.arrive_h) for v in short] == [("cp05", 9.0)]
    assert short[0].published_shortfall_wh > 0.5 * (short[0].requested_wh - short[0].delivered_wh)
    assert len(opt.vehicles) == len(sc.vehicles)
    assert opt.cost < now.cost
