"""``essd demo``: the daemon on the simulated example site, with no hardware, broker or config.

It starts hil_sim with the embedded example site (an industrial PCS, two household inverters, a
portable camping unit and the grid meter, with a day of load, PV, prices and carbon intensity),
runs the real daemon against it over loopback Modbus on a simulated clock running ``speed``
times faster than real time, shows a live terminal view (or plain log lines) and serves the
metrics. MQTT publishing starts when ``[mqtt]`` is configured through ``ESSD_MQTT__...``.

The demo's daemon forecasts from the site's own series file (perfect foresight of the day),
so what it shows is the dispatch itself; a real site learns its load online.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from essd.clock import SimClock, local_midnight
from essd.config import Settings
from essd.config_loading import ConfigError, load_settings
from essd.daemon import Daemon
from essd.events import EventBus
from essd.logs import configure_logging
from essd.sdnotify import SystemdNotifier
from essd.tui import LogLines, TerminalView

__all__ = ["EXAMPLE_SITE", "demo_settings", "register_cli", "run_demo"]

EXAMPLE_SITE = Path(__file__).parents[1] / "profiles" / "sites" / "example.toml"
EXAMPLE_SERIES = EXAMPLE_SITE.with_suffix(".csv")

log = logging.getLogger(__name__)


def demo_settings(base: Settings) -> Settings:
    """The example site with forecasts from its own series file."""
    forecast = base.forecast.model_copy(
        update={"load": "file", "pv": "file", "series_file": EXAMPLE_SERIES}
    )
    return base.model_copy(update={"forecast": forecast})


def _start_time(tz: ZoneInfo) -> float:
    """Local midnight of the series' day, so the demo plays the whole day from its start."""
    first = EXAMPLE_SERIES.read_text().splitlines()[1].split(",", 1)[0]
    return local_midnight(datetime.fromisoformat(first).timestamp(), tz)


async def run_demo(
    *,
    speed: float,
    duration_s: float,
    metrics_port: int | None,
    tui: bool,
    log_every: int = 6,
) -> int:
    """Run the demo; returns the exit code."""
    from hil_sim.runner import SimulatedSite  # noqa: PLC0415 - the simulator only for the demo

    try:
        base = load_settings(EXAMPLE_SITE)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    settings = demo_settings(base)
    tz = ZoneInfo(settings.site.timezone)
    clock = SimClock(_start_time(tz), speed=speed)
    bus = EventBus()
    if tui and sys.stdout.isatty():
        bus.subscribe(TerminalView(site=settings.site.id, tz=tz, currency=settings.tariff.currency))
    else:
        bus.subscribe(LogLines(tz=tz, every=log_every))
    async with SimulatedSite(settings, clock=clock, free_ports=True) as sim:
        for ep in sim.endpoints():
            print(ep.line(), flush=True)
        daemon = Daemon(
            settings=sim.settings,
            clock=clock,
            bus=bus,
            notifier=SystemdNotifier(address=None),
            metrics_port=metrics_port,
            on_started=lambda d: print(f"metrics: {d.metrics_url or 'off'}", flush=True),
        )
        code = await daemon.run(duration_s=duration_s)
        violations = sim.truth().violations
        print(
            f"demo finished: {duration_s / 3600:.1f} simulated hours, "
            f"{len(violations)} limit violations in the simulator",
            flush=True,
        )
        return code


def _cmd_demo(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    return asyncio.run(
        run_demo(
            speed=args.speed,
            duration_s=args.duration,
            metrics_port=args.metrics_port,
            tui=not args.no_tui,
        )
    )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


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
        "--metrics-port", type=int, default=None, help="Prometheus port (default 9108; 0: any)"
    )
    p.add_argument("--no-tui", action="store_true", help="plain log lines instead of the view")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_cmd_demo)
