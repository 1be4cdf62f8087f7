"""A simulated day of the example site over real loopback Modbus against hil_sim.

The daemon core runs cycle after cycle on a stepped simulated clock (5-minute cycles, so a day
is 288 cycles); the simulator integrates the physics between them and records every limit
violation from the true state (not the daemon's belief).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.demo import EXAMPLE_SITE, demo_settings
from essd.domain import FallbackRung
from essd.events import EventBus
from hil_sim.runner import SimulatedSite
from tests.support.site import cycles_of

CYCLE_S = 300.0
START = datetime(2026, 1, 1, 0, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


async def test_a_simulated_day_runs_without_a_single_violation() -> None:
    base = demo_settings(load_settings(EXAMPLE_SITE))
    control = base.control.model_copy(
        update={"cycle_period_s": CYCLE_S, "setpoint_ttl_s": 2 * CYCLE_S}
    )
    settings = base.model_copy(update={"control": control})
    clock = SimClock(START)
    bus = EventBus()
    events = cycles_of(bus)
    async with SimulatedSite(settings, clock=clock, free_ports=True) as sim:
        pool = EndpointPool(clock=clock)
        ctl = build_controller(sim.settings, clock=clock, bus=bus, pool=pool)
        try:
            for _ in range(int(86_400 / CYCLE_S)):
                await ctl.run_cycle()
                clock.advance(CYCLE_S)
            truth = sim.truth()
        finally:
            await pool.close()

    assert len(events) == 288
    assert truth.violations == ()
    rungs = Counter(e.plan.rung for e in events)
    assert rungs[FallbackRung.OPTIMAL] + rungs[FallbackRung.SOFT] >= 0.95 * len(events), rungs
    # The batteries were used.
    moved = sum(abs(sp.power_w) for e in events for sp in e.setpoints.values())
    assert moved > 0
    for e in events:
        assert e.grid_power_w is not None
        assert -e.export_limit_w - 1.0 <= e.grid_power_w
