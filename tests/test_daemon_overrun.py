"""Overruns are counted and never stacked: a late cycle skips to the next boundary."""

from __future__ import annotations

import gc
import itertools

from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import Daemon
from essd.events import EventBus
from essd.sdnotify import SystemdNotifier
from hil_sim.runner import SimulatedSite
from tests.support.site import EXAMPLE, cycles_of


async def test_cycles_longer_than_the_period_are_counted_not_stacked() -> None:
    base = load_settings(EXAMPLE)
    control = base.control.model_copy(update={"cycle_period_s": 1.0, "setpoint_ttl_s": 10.0})
    # 1 simulated second is 0.5 ms of real time: every cycle (tens of ms) overruns.
    clock = SimClock(1_767_225_600.0, speed=2000.0)
    settings = base.model_copy(update={"control": control})
    async with SimulatedSite(settings, clock=clock, free_ports=True) as site:
        bus = EventBus()
        events = cycles_of(bus)
        gc.unfreeze()
        daemon = Daemon(
            settings=site.settings,
            clock=clock,
            bus=bus,
            notifier=SystemdNotifier(address=None),
            serve_metrics=False,
        )
        assert await daemon.run(duration_s=600.0) == 0
    # After its first cycle the daemon froze what start-up built (essd.daemon.settle_heap).
    assert gc.get_freeze_count() > 10_000
    gc.unfreeze()
    assert events
    assert all(e.overrun for e in events)
    assert events[-1].overruns_total == len(events)
    # 600 simulated seconds would be 600 cycles if late cycles were stacked to catch up.
    assert len(events) < 300
    # Each cycle starts on a period boundary after the late one, never back to back in a burst.
    starts = [e.time for e in events]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(starts))
