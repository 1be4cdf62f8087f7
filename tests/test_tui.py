"""The terminal view and log lines render a cycle event readably."""

from __future__ import annotations

import io
from zoneinfo import ZoneInfo

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.events import EventBus
from essd.tui import LogLines, TerminalView, render
from hil_sim.runner import SimulatedSite
from tests.support.site import EXAMPLE

TZ = ZoneInfo("Asia/Shanghai")


async def test_view_shows_every_device_grid_price_and_rung() -> None:
    clock = SimClock(1_767_225_600.0)
    async with SimulatedSite(load_settings(EXAMPLE), clock=clock, free_ports=True) as site:
        pool = EndpointPool(clock=clock)
        bus = EventBus()
        screen, lines = io.StringIO(), io.StringIO()
        view = TerminalView(site="demo", tz=TZ, currency="CNY", out=screen)
        bus.subscribe(view)
        bus.subscribe(LogLines(tz=TZ, out=lines))
        ctl = build_controller(site.settings, clock=clock, bus=bus, pool=pool)
        try:
            event = await ctl.run_cycle()
        finally:
            await pool.close()
    view.close()
    text = render(event, site="demo", tz=TZ)
    assert "2026-01-01 08:00:00" in text  # local time of the site
    for dev in ("pcs1", "home-a", "home-b", "camp1", "meter"):
        assert f"\n{dev} " in text
    assert "grid " in text
    assert "rung 1 optimal" in text
    assert "CNY/kWh" in text
    # The view draws one live region (no full-screen clear that floods the scrollback).
    assert "\x1b[2J" not in screen.getvalue()
    assert "rung 1 optimal" in screen.getvalue()
    assert "plan, next 24 h  battery " in text
    assert "cycle=1 " in lines.getvalue()
    assert "setpoints[camp1=" in lines.getvalue()
