"""``essd demo``: the daemon on the simulated example site, with no hardware, broker or config.

It starts hil_sim with the embedded example site (an industrial PCS, two household inverters, a
portable camping unit and the grid meter, with a day of load, PV, prices and carbon intensity),
runs the real daemon against it over loopback Modbus on a simulated clock running ``speed``
times faster than real time, shows a live terminal view (or plain log lines) and serves the
metrics. MQTT publishing starts when ``[mqtt]`` is configured through ``ESSD_MQTT__...``.

By default it plays 24 simulated hours at 60x (24 minutes) from 11:00, the start of the
morning price peak, so the batteries move at once. Ctrl-C stops it early; either way it ends
with a summary of what actually ran: simulated hours, cost, savings and limit violations.

The demo's daemon forecasts from the site's own series file (perfect foresight of the day),
so what it shows is the dispatch itself; a real site learns its load online.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from essd.config import Settings
    from essd.events import CycleCompleted, Event


EXAMPLE_SITE = Path(__file__).parents[1] / "profiles" / "sites" / "example.toml"
EXAMPLE_SERIES = EXAMPLE_SITE.with_suffix(".csv")

#: Local time the demo starts at: the morning price peak, when the batteries discharge.
DEFAULT_START = time(11, 0)


def demo_settings(base: Settings) -> Settings:
    """The example site with forecasts from its own series file."""
    forecast = base.forecast.model_copy(
        update={"load": "file", "pv": "file", "series_file": EXAMPLE_SERIES}
    )
    return base.model_copy(update={"forecast": forecast})


def _start_time(tz: ZoneInfo, at: time = DEFAULT_START) -> float:
    """``at`` (local time) on the series' day."""
    first = EXAMPLE_SERIES.read_text().splitlines()[1].split(",", 1)[0]
    day = datetime.fromisoformat(first).astimezone(tz).date()
    start = datetime.combine(day, at, tzinfo=tz)
    return (start - timedelta(0)).timestamp()


@dataclass
class DemoRecord:
    """What the demo actually ran, from the cycles it saw (bus subscriber)."""

    start: float
    first: CycleCompleted | None = None
    last: CycleCompleted | None = None
    cycles: int = field(default=0)

    def __call__(self, event: Event) -> None:
        """Bus subscriber: keep the first and the latest cycle."""
        from essd.events import CycleCompleted  # noqa: PLC0415

        if isinstance(event, CycleCompleted):
            if self.first is None:
                self.first = event
            self.last = event
            self.cycles += 1

    @property
    def hours_run(self) -> float:
        """Simulated hours from the start to the latest completed cycle."""
        return 0.0 if self.last is None else max(0.0, self.last.time - self.start) / 3600

    def summary(self, *, planned_s: float, currency: str, violations: int) -> str:
        """The closing lines: hours actually run (of those asked), cost, savings, violations."""
        hours = self.hours_run
        finished = hours * 3600 >= planned_s - 2 * (self.last.period_s if self.last else 0)
        head = (
            f"demo finished: {hours:.1f} simulated hours"
            if finished
            else f"demo stopped: {hours:.1f} of {planned_s / 3600:.1f} simulated hours run"
        )
        lines = [f"{head}, {violations} limit violations in the simulator"]
        if self.first is not None and self.last is not None:
            a, b = self.first.totals, self.last.totals
            # Savings count energy bought into the batteries now and used later only when it
            # is used: say how much is still stored, so a charging hour is read right.
            stored = (b.battery_charged_wh - a.battery_charged_wh) - (
                b.battery_discharged_wh - a.battery_discharged_wh
            )
            lines.append(
                f"cost {b.cost - a.cost:.2f} {currency}, saved by the batteries "
                f"{b.savings - a.savings:.2f} {currency}, batteries' net charge "
                f"{stored / 1000:+.1f} kWh, imported "
                f"{(b.imported_wh - a.imported_wh) / 1000:.1f} kWh, billing peak "
                f"{self.last.billing_peak_w / 1000:.1f} kW, {self.last.overruns_total} of "
                f"{self.last.cycle} cycles overran"
            )
        return "\n".join(lines)


async def run_demo(
    *,
    speed: float,
    duration_s: float,
    metrics_port: int | None,
    tui: bool,
    log_every: int = 6,
    start_at: time = DEFAULT_START,
) -> int:
    """Run the demo; returns the exit code."""
    # The daemon, the optimizer and the simulator load only when the demo runs.
    import time as walltime  # noqa: PLC0415
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    from essd.clock import SimClock  # noqa: PLC0415
    from essd.config_loading import ConfigError, load_settings  # noqa: PLC0415
    from essd.daemon import Daemon  # noqa: PLC0415
    from essd.events import EventBus  # noqa: PLC0415
    from essd.sdnotify import SystemdNotifier  # noqa: PLC0415
    from essd.tui import LogLines, Progress, TerminalView  # noqa: PLC0415
    from hil_sim.runner import SimulatedSite  # noqa: PLC0415

    try:
        base = load_settings(EXAMPLE_SITE)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    settings = demo_settings(base)
    tz = ZoneInfo(settings.site.timezone)
    start = _start_time(tz, start_at)
    clock = SimClock(start, speed=speed)
    bus = EventBus()
    record = DemoRecord(start)
    bus.subscribe(record)
    currency = settings.tariff.currency
    intro = (
        f"essd demo: {duration_s / 3600:g} simulated hours at {speed:g}x "
        f"(about {duration_s / speed / 60:.0f} min) from {start_at:%H:%M}; Ctrl-C stops early"
    )
    view: TerminalView | None = None
    if tui and sys.stdout.isatty():
        progress = Progress(start, duration_s, speed, walltime.monotonic())
        view = TerminalView(site=settings.site.id, tz=tz, currency=currency, progress=progress)
        view.header.append(intro)
        bus.subscribe(view)
    else:
        print(intro, flush=True)
        bus.subscribe(LogLines(tz=tz, every=log_every, speed=speed))

    def show(line: str) -> None:
        # With the view, on its screen for good; else as a line of the log.
        if view is not None:
            view.header.append(line)
        else:
            print(line, flush=True)

    async with SimulatedSite(settings, clock=clock, free_ports=True) as sim:
        for ep in sim.endpoints():
            show(ep.line())
        daemon = Daemon(
            settings=sim.settings,
            clock=clock,
            bus=bus,
            notifier=SystemdNotifier(address=None),
            metrics_port=metrics_port,
            on_started=lambda d: show(f"metrics: {d.metrics_url or 'off'}"),
        )
        try:
            code = await daemon.run(duration_s=duration_s)
        finally:
            if view is not None:
                view.close()
        violations = len(sim.truth().violations)
        print(
            record.summary(planned_s=duration_s, currency=currency, violations=violations),
            flush=True,
        )
        return code


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - `essd --help` registers this module: keep it light

    from essd.logs import configure_logging  # noqa: PLC0415

    configure_logging(args.log_level)
    return asyncio.run(
        run_demo(
            speed=args.speed,
            duration_s=args.duration,
            metrics_port=args.metrics_port,
            tui=not args.no_tui,
            start_at=args.start,
        )
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _clock_time(text: str) -> time:
    try:
        return time.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time of day (HH:MM): {text!r}") from None


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``essd demo``."""
    p = sub.add_parser(
        "demo",
        help="run the daemon on a simulated example site (no hardware needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--speed", type=_positive, default=60.0, help="simulated s per real s (60)")
    p.add_argument(
        "--duration", type=_positive, default=86_400.0, help="simulated seconds (one day)"
    )
    p.add_argument(
        "--start",
        type=_clock_time,
        default=DEFAULT_START,
        help="local time of day to start at (11:00, the price peak: the batteries move at once)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port (default 9108; 0: any)"
    )
    p.add_argument("--no-tui", action="store_true", help="plain log lines instead of the view")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_demo)
