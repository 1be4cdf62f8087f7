"""The ``essd`` command line.

Exit codes: 0 success, 1 runtime failure, 2 invalid input (configuration, arguments, files).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from essd import DEFAULT_CONFIG_PATH, __version__
from essd.backtest.cli import register_cli as register_backtest
from essd.demo import register_cli as register_demo
from essd.hil.cli import register as register_hil
from essd.logs import configure_logging
from essd.probe_cli import register_cli as register_probe
from essd.schema import register as register_schema
from hil_sim.cli import register_cli as register_sim

if TYPE_CHECKING:
    from essd.config import Settings


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2

Command = Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def load_checked(path: Path) -> tuple[Settings, tuple[str, ...]] | None:
    """The configuration at ``path`` and its warnings, checked exactly as ``run`` checks it
    (:func:`essd.sitecheck.validate_site`); None after printing the problems."""
    # `essd --help` must stay fast: pydantic and the site checks load only when used.
    from essd.config_loading import ConfigError, load_settings  # noqa: PLC0415
    from essd.sitecheck import validate_site  # noqa: PLC0415

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for line in exc.problems:
            _err(line)
        return None
    check = validate_site(settings, str(path))
    for line in check.problems:
        _err(line)
    return None if check.problems else (settings, check.warnings)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a configuration file (and its device profiles); print warnings too."""
    path: Path = args.config_file
    checked = load_checked(path)
    if checked is None:
        return EXIT_INVALID
    settings, warnings = checked
    for line in warnings:
        source, _, rest = line.partition(": ")
        _err(f"{source}: warning: {rest}")
    # The MQTT bridge logs these itself when it starts; check-config shows them before.
    for line in settings.mqtt.security_warnings() if settings.mqtt is not None else ():
        _err(f"{path}: warning: {line}")
    print(f"{path}: ok (site {settings.site.id}, {len(settings.devices)} devices)")
    return EXIT_OK


def cmd_profiles_list(args: argparse.Namespace) -> int:
    """One line per profile: name, device class, description."""
    from drivers.profile import ProfileError  # noqa: PLC0415
    from drivers.profile_loader import list_profiles  # noqa: PLC0415

    try:
        profiles = list_profiles(tuple(args.profile_dir))
    except ProfileError as exc:
        _err(str(exc))
        return EXIT_INVALID
    width = max((len(p.name) for p in profiles), default=0)
    for p in profiles:
        print(f"{p.name:<{width}}  {p.device_class.value:<10}  {p.description}")
    return EXIT_OK


def cmd_profiles_show(args: argparse.Namespace) -> int:
    """Print one profile's file."""
    from drivers.profile import ProfileError  # noqa: PLC0415
    from drivers.profile_loader import resolve_profile  # noqa: PLC0415

    try:
        profile = resolve_profile(args.name, tuple(args.profile_dir))
    except ProfileError as exc:
        _err(str(exc))
        return EXIT_INVALID
    import yaml  # noqa: PLC0415

    print(yaml.safe_dump(profile.model_dump(mode="json", by_alias=True), sort_keys=False), end="")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    import asyncio  # noqa: PLC0415

    from drivers.profile import ProfileError  # noqa: PLC0415
    from essd.config_loading import ConfigError  # noqa: PLC0415

    path: Path = args.config
    if (args.sim_start is not None or args.sim_anchor is not None) and args.sim_speed is None:
        _err("--sim-start/--sim-anchor: need --sim-speed")
        return EXIT_INVALID
    if args.sim_speed is not None and not 0 < args.sim_speed <= 1e6:
        _err(f"--sim-speed: must be in (0, 1e6], got {args.sim_speed}")
        return EXIT_INVALID
    checked = load_checked(path)
    if checked is None:
        return EXIT_INVALID
    settings, _ = checked  # the warnings are logged once each as the devices are built
    configure_logging(args.log_level or settings.logging.level, settings.logging.format)
    from essd.clock import Clock, RealClock, SimClock  # noqa: PLC0415
    from essd.daemon import Daemon  # noqa: PLC0415 - heavy imports (cvxpy) only when running

    clock: Clock = RealClock()
    if args.sim_speed is not None:
        clock = SimClock(
            args.sim_start if args.sim_start is not None else 0.0,
            speed=args.sim_speed,
            anchor_wall=args.sim_anchor,
        )
    try:
        return asyncio.run(Daemon(settings=settings, clock=clock).run())
    except ProfileError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except ConfigError as exc:  # a file changed between the check above and the start
        for line in exc.problems:
            _err(line)
        return EXIT_INVALID


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``essd`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="essd", description="Energy storage control and dispatch daemon."
    )
    parser.add_argument("--version", action="version", version=f"essd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon (production)")
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="TOML file")
    r.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None)
    hil = r.add_argument_group(
        "simulated time (hardware-in-the-loop against `essd sim` only, never on a real site)"
    )
    hil.add_argument("--sim-speed", type=float, default=None, help="simulated s per real s")
    hil.add_argument("--sim-start", type=float, default=None, help="simulated start, epoch s")
    hil.add_argument(
        "--sim-anchor",
        type=float,
        default=None,
        help="wall-clock epoch s at which the simulated time was --sim-start (shared with the sim)",
    )
    r.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("config_file", type=Path, nargs="?", default=DEFAULT_CONFIG_PATH)
    p.set_defaults(func=cmd_check_config)

    prof = sub.add_parser("profiles", help="list or show device profiles")
    psub = prof.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")
    pl = psub.add_parser("list", help="one line per profile: name, class, description")
    pl.add_argument("--profile-dir", type=Path, action="append", default=[])
    pl.set_defaults(func=cmd_profiles_list)
    ps = psub.add_parser("show", help="print a profile")
    ps.add_argument("name")
    ps.add_argument("--profile-dir", type=Path, action="append", default=[])
    ps.set_defaults(func=cmd_profiles_show)

    register_probe(sub)
    register_schema(sub)
    register_sim(sub)
    register_demo(sub)
    register_backtest(sub)
    register_hil(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``essd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`essd profiles list | head`): not an error of ours.
        import os  # noqa: PLC0415

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
