"""``essd probe`` on the command line: arguments and exit codes. The work is
:mod:`essd.probe`, imported when the command runs, so ``essd --help`` stays light.

Exit codes: 0 every check passed, 1 a check failed or the device did not answer, 2 invalid
arguments or profile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def cmd_probe(args: argparse.Namespace) -> int:
    """The ``essd probe`` command."""
    import asyncio  # noqa: PLC0415 - the command's own imports, not --help's

    from drivers.profile import ProfileError  # noqa: PLC0415
    from drivers.profile_loader import resolve_profile  # noqa: PLC0415
    from essd.probe import TransportError, parse_transport, probe  # noqa: PLC0415

    try:
        profile = resolve_profile(args.profile, tuple(args.profile_dir))
        target = parse_transport(args.transport)
    except (ProfileError, TransportError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    unit = profile.transport.unit if args.unit is None else args.unit

    def confirm(question: str) -> bool:
        if args.yes:
            return True
        try:
            return input(f"{question} Type 'yes' to go on: ").strip().lower() == "yes"
        except EOFError:
            return False

    report = asyncio.run(
        probe(
            profile, target, unit, write_test=args.write_test, confirm=confirm, step_s=args.step_s
        )
    )
    for note in report.notes:
        print(note)
    for failure in report.failures:
        print(f"FAIL {failure}", file=sys.stderr)
    verdict = "all checks passed" if not report.failures else f"{len(report.failures)} failed"
    print(f"{profile.name} at {target} unit {unit}: {verdict}")
    return EXIT_OK if not report.failures else EXIT_FAILURE


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``probe`` to ``essd``'s subcommands."""
    p = subparsers.add_parser("probe", help="read a device through a profile before going live")
    p.add_argument("--profile", required=True, help="profile name (essd profiles list)")
    p.add_argument(
        "--transport",
        required=True,
        help="tcp://HOST:PORT, rtu-over-tcp://HOST:PORT or rtu:///dev/ttyUSB0?baud=9600&parity=N",
    )
    p.add_argument("--unit", type=int, default=None, help="Modbus unit id (default: profile's)")
    p.add_argument("--profile-dir", type=Path, action="append", default=[])
    p.add_argument(
        "--write-test",
        action="store_true",
        help="also write a small charge/idle/discharge/idle cycle (asks first; idles on exit)",
    )
    p.add_argument("--yes", action="store_true", help="do not ask before --write-test")
    p.add_argument("--step-s", type=float, default=3.0, help="seconds per write-test step")
    p.set_defaults(func=cmd_probe)
