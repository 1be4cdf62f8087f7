"""``essd hil ev SCENARIO.yaml... [--report FILE]``: run EV / swap-station HIL
scenarios against their baselines and print (or write) the Markdown report.

Exit status: 0 when every expectation held, 1 when one failed, 2 for an unusable scenario
file (the message names the file and the field).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from essd.hil.ev_report import Comparison
    from essd.hil.ev_scenario import EvScenario


def compare(sc: EvScenario) -> Comparison:
    """Run ``sc`` optimized and as its baseline."""
    # `essd --help` registers this module: the runners (optimizer, simulator) load only here.
    import asyncio  # noqa: PLC0415

    from essd.hil.ev_report import compare_chargers, compare_swap  # noqa: PLC0415
    from essd.hil.ev_runner import run_chargers  # noqa: PLC0415
    from essd.hil.swap_runner import run_swap  # noqa: PLC0415

    if sc.swap is not None:
        return compare_swap(sc, run_swap(sc, mode="optimized"), run_swap(sc, mode="asap"))
    opt = asyncio.run(run_chargers(sc, mode="optimized"))
    now = asyncio.run(run_chargers(sc, mode="now"))
    return compare_chargers(sc, opt, now)


def cmd_hil_ev(args: argparse.Namespace) -> int:
    """``essd hil ev SCENARIO... [--report FILE]``; see the module docstring."""
    from essd.hil.ev_report import render  # noqa: PLC0415 - heavy imports only when running
    from essd.hil.ev_scenario import EvScenarioError, load_ev_scenario  # noqa: PLC0415

    try:
        scenarios = [load_ev_scenario(p) for p in args.scenarios]
    except EvScenarioError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    comparisons = [compare(sc) for sc in scenarios]
    text = render(comparisons) + "\n"
    if args.report is not None:
        args.report.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 1 if any(c.failures for c in comparisons) else 0


def add_parser(hsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``essd hil ev`` to the ``essd hil`` actions."""
    e = hsub.add_parser("ev", help="run EV / swap-station scenarios against their baselines")
    e.add_argument("scenarios", nargs="+", type=Path, help="scenario YAML files (scenarios/ev)")
    e.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    e.set_defaults(func=cmd_hil_ev)
