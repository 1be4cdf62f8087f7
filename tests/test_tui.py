"""The terminal view and log lines render a cycle event readably."""

from __future__ import annotations

import dataclasses
import io
from zoneinfo import ZoneInfo

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.demo import DemoRecord
from essd.events import CycleCompleted, EventBus
from essd.tui import (
    LogLines,
    Progress,
    TerminalView,
    overrun_warning,
    progress_line,
    render,
    sparkline,
)
from hil_sim.runner import SimulatedSite
from tests.support.mqtt import T0, make_cycle
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


def _cycle(k: int, overruns: int) -> CycleCompleted:
    return dataclasses.replace(make_cycle(k), cycle=k, overruns_total=overruns)


def test_progress_line_shows_simulated_time_of_total_and_an_eta_from_real_time() -> None:
    p = Progress(start=T0, total_s=86_400.0, speed=60.0, wall_start=100.0)
    assert progress_line(p, T0, 100.0) == "simulated 00:00 of 24:00 h (0%)   ETA 24m00s at 60x"
    # 2 h 30 min simulated in 150 s of real time: on pace, 21h30m left at 60x.
    line = progress_line(p, T0 + 9000.0, 250.0)
    assert line == "simulated 02:30 of 24:00 h (10%)   ETA 21m30s at 60x"
    # A host slower than asked (half the pace): the ETA tells the truth, not the speed.
    assert progress_line(p, T0 + 9000.0, 400.0).endswith("ETA 43m00s at 60x")
    # Past the end it stays at the total.
    assert progress_line(p, T0 + 90_000.0, 2000.0).startswith("simulated 24:00 of 24:00 h (100%)")


def test_sparkline_scales_and_resamples() -> None:
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0] * 4) == "▅▅▅▅"
    assert sparkline([]) == ""
    assert len(sparkline(list(range(96)), width=48)) == 48


def test_overrun_warning_only_when_cycles_keep_overrunning() -> None:
    assert overrun_warning(_cycle(30, 1), 60.0) == ""  # the first cycle's connect
    assert overrun_warning(_cycle(641, 20), 60.0) == ""  # 3 %: the host keeps up
    warning = overrun_warning(_cycle(641, 638), 600.0)
    assert warning == (
        "WARNING: 638 of 641 cycles overran their 10 s period at 600x: this host cannot keep "
        "up, lower --speed"
    )
    lines = io.StringIO()
    log = LogLines(tz=TZ, out=lines, every=1000, speed=600.0)
    for k in range(1, 12):
        log(_cycle(k, k))
    assert lines.getvalue().count("WARNING: ") == 1  # warned once, not every cycle


def test_the_demo_summary_names_the_hours_actually_run() -> None:
    record = DemoRecord(start=T0)
    first = make_cycle(1, time=T0 + 10.0)
    record(first)
    last = dataclasses.replace(
        make_cycle(90, time=T0 + 900.0),
        totals=dataclasses.replace(
            first.totals,
            cost=first.totals.cost + 4.5,
            savings=1.25,
            battery_charged_wh=first.totals.battery_charged_wh + 3000.0,
            battery_discharged_wh=first.totals.battery_discharged_wh + 500.0,
        ),
    )
    record(last)
    text = record.summary(planned_s=86_400.0, currency="CNY", violations=0)
    assert text.splitlines()[0] == (
        "demo stopped: 0.2 of 24.0 simulated hours run, 0 limit violations in the simulator"
    )
    assert text.splitlines()[1].startswith(
        "cost 4.50 CNY, saved by the batteries 1.25 CNY, batteries' net charge +2.5 kWh,"
    )
    done = DemoRecord(start=T0)
    done(dataclasses.replace(make_cycle(1), time=T0 + 7200.0))
    assert done.summary(planned_s=7200.0, currency="CNY", violations=2).startswith(
        "demo finished: 2.0 simulated hours, 2 limit violations"
    )
