"""Command line of the simulator: ``python -m hil_sim --site FILE`` and ``essd sim``.

Starts every device of the site config (the same file the daemon reads), prints one line per
device -- ``<device id> <profile> modbus-tcp://127.0.0.1:<port> unit=<id>`` (or
``modbus-rtu-over-tcp://...``, or the serial path) -- and runs until SIGTERM or SIGINT.

Exit codes: 0 stopped by a signal, 1 runtime failure (a port in use...), 2 invalid input (the
site, a profile, the series or the fault file), each problem naming the file and the field.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from essd.clock import Clock
    from hil_sim.runner import SimulatedSite


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def _speed(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed: not a number: {text!r}") from None
    if not 0 < v <= 1e6:
        raise argparse.ArgumentTypeError(f"--speed: must be in (0, 1e6], got {text}")
    return v


def _start(text: str) -> float:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--start: not ISO 8601: {text!r}") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--start: needs a UTC offset: {text!r}")
    return dt.timestamp()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options (shared by ``python -m hil_sim`` and ``essd sim``)."""
    parser.add_argument("--site", type=Path, required=True, help="the site config (essd TOML)")
    parser.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        help="simulated seconds per real second (1 = real time; CI uses 600)",
    )
    parser.add_argument(
        "--start",
        type=_start,
        help="simulated start time, ISO 8601 with a UTC offset (default: now)",
    )
    parser.add_argument("--faults", type=Path, help="fault timeline (YAML)")
    parser.add_argument(
        "--series",
        type=Path,
        help="load/PV series CSV (default: forecast.series_file, "
        "<site>.csv beside the site file, else the example site's)",
    )
    parser.add_argument(
        "--free-ports", action="store_true", help="serve on free ports, not the configured ones"
    )
    parser.add_argument(
        "--export-limiter", action="store_true", help="PV curtails to the site's export limit"
    )
    parser.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO"
    )
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="put every TCP device behind a delaying proxy (for delay faults at run time)",
    )


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sim`` to ``essd``'s subcommands."""
    p = subparsers.add_parser("sim", help="serve a site's devices as simulated hardware")
    add_arguments(p)
    p.set_defaults(func=run)


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _load(args: argparse.Namespace) -> SimulatedSite | int:
    # The simulator (pymodbus, SunSpec models) loads only when `sim` runs, so that `essd`'s
    # other commands start fast.
    from drivers.profile import ProfileError  # noqa: PLC0415
    from essd.clock import RealClock, SimClock  # noqa: PLC0415
    from essd.config_loading import ConfigError, load_settings  # noqa: PLC0415
    from essd.series import SeriesError  # noqa: PLC0415
    from hil_sim.faults import FaultError, FaultSpec, load_faults  # noqa: PLC0415
    from hil_sim.runner import SimulatedSite  # noqa: PLC0415
    from hil_sim.site import SiteSeries, default_series_path  # noqa: PLC0415

    try:
        settings = load_settings(args.site)
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_INVALID
    faults: tuple[FaultSpec, ...] = ()
    try:
        if args.faults is not None:
            faults = load_faults(args.faults)
        tz = ZoneInfo(settings.site.timezone)
        series_path = args.series or default_series_path(settings, args.site)
        series = SiteSeries.load(series_path, tz)
    except (FaultError, SeriesError) as exc:
        _err(str(exc))
        return EXIT_INVALID
    if args.speed == 1.0 and args.start is None:
        clock: Clock = RealClock()
    else:
        # A simulated clock starts now (or at --start) and runs --speed times faster.
        start = time.time() if args.start is None else args.start
        clock = SimClock(start, speed=args.speed)
    try:
        sim = SimulatedSite(
            settings,
            clock=clock,
            series=series,
            faults=faults,
            free_ports=args.free_ports,
            proxy=args.proxy,
            export_limiter=args.export_limiter,
            source=str(args.site),
            faults_source=str(args.faults),
        )
    except ProfileError as exc:
        for line in str(exc).splitlines():
            _err(f"{args.site}: devices: {line}")
        return EXIT_INVALID
    except ValueError as exc:  # FaultError, and a site the simulator cannot serve
        _err(str(exc))
        return EXIT_INVALID
    return sim


async def _serve(sim: SimulatedSite) -> int:
    import asyncio  # noqa: PLC0415 - `essd --help` registers this module: keep it light

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with sim:
            for e in sim.endpoints():
                print(e.line(), flush=True)
            await stop.wait()
    except OSError as exc:
        _err(f"cannot serve the site: {exc}")
        return EXIT_FAILURE
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run the simulator for parsed arguments (the ``essd sim`` entry)."""
    # Fault transitions and device reverts are logged on stderr; stdout holds the device lines.
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sim = _load(args)
    if isinstance(sim, int):
        return sim
    import asyncio  # noqa: PLC0415

    return asyncio.run(_serve(sim))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hil_sim``."""
    parser = argparse.ArgumentParser(
        prog="python -m hil_sim", description="Serve a site's devices as simulated hardware."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
