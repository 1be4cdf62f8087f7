"""``essd hil run SCENARIO`` and ``essd hil run-all DIR``.

Exit codes as the rest of ``essd``: 0 every expectation held, 1 an expectation failed (each
named on stderr), 2 invalid input (a scenario that does not validate, naming file and field).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

from essd.hil.ev_cli import add_parser as add_ev_parser

__all__ = ["register"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _run_one(path: Path, report: Path | None) -> tuple[int, dict[str, object]]:
    """Run one scenario file; (exit code, table row)."""
    from drivers.profile import ProfileError  # noqa: PLC0415 - heavy imports only when running
    from essd.hil.report import write_report  # noqa: PLC0415
    from essd.hil.runner import run_scenario  # noqa: PLC0415
    from essd.hil.scenario import ScenarioError, load_scenario  # noqa: PLC0415

    row: dict[str, object] = {"name": path.stem, "result": "invalid"}
    wall0 = time.perf_counter()
    try:
        scenario, settings = load_scenario(path)
    except ScenarioError as exc:
        for line in exc.problems:
            _err(line)
        return EXIT_INVALID, row
    row["name"] = scenario.name
    try:
        with tempfile.TemporaryDirectory(prefix="essd-hil-") as tmp:
            workdir = report if report is not None else Path(tmp)
            result = asyncio.run(run_scenario(scenario, settings, workdir=workdir))
            if report is not None:
                md = write_report(result, report)
                print(f"{scenario.name}: report written to {md}")
    except ProfileError as exc:
        _err(f"{path}: site: {exc}")
        return EXIT_INVALID, row
    k = result.kpis
    row.update(
        result="pass" if result.passed else "FAIL",
        cost=k.cost,
        baseline=k.baseline_cost,
        savings=k.savings,
        violations=k.violations,
        worst_rung=k.worst_rung,
        wall_s=time.perf_counter() - wall0,
    )
    for failure in result.failures:
        _err(f"{path}: expectation failed: {failure}")
    return (EXIT_OK if result.passed else EXIT_FAILED), row


def cmd_hil_run(args: argparse.Namespace) -> int:
    """Run one scenario, write its report, exit non-zero when an expectation fails."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    code, row = _run_one(args.scenario, args.report)
    if code != EXIT_INVALID:
        print(
            f"{row['name']}: {row['result']}: cost {row['cost']:.2f}, baseline "
            f"{row['baseline']:.2f}, savings {row['savings']:.2f}, violations "
            f"{row['violations']}, worst rung {row['worst_rung']}, {row['wall_s']:.1f} s wall"
        )
    return code


def _cell(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def cmd_hil_run_all(args: argparse.Namespace) -> int:
    """Run every ``*.yaml`` scenario in a folder and print one table row each."""
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    folder: Path = args.directory
    files = sorted(folder.glob("*.yaml"))
    if not files:
        _err(f"{folder}: no scenario files (*.yaml)")
        return EXIT_INVALID
    rows = []
    worst = EXIT_OK
    for path in files:
        report = args.report / path.stem if args.report is not None else None
        code, row = _run_one(path, report)
        worst = max(worst, code)
        rows.append(row)
    cols = ["name", "result", "cost", "baseline", "savings", "violations", "worst_rung", "wall_s"]
    cells = [[_cell(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return worst


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``essd hil`` and its actions to the ``essd`` parser."""
    hil = sub.add_parser("hil", help="run HIL scenarios against the simulated site")
    hsub = hil.add_subparsers(dest="hil_command", required=True, metavar="ACTION")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    r = hsub.add_parser("run", help="run one scenario and report its figures")
    r.add_argument("scenario", type=Path, help="scenario YAML file")
    r.add_argument("--report", type=Path, default=None, help="write kpis.json, plots, report.md")
    r.add_argument("--log-level", choices=levels, default="ERROR")
    r.set_defaults(func=cmd_hil_run)
    a = hsub.add_parser("run-all", help="run every scenario in a folder, print a table")
    a.add_argument("directory", type=Path, help="folder of scenario YAML files")
    a.add_argument("--report", type=Path, default=None, help="one report folder per scenario")
    a.add_argument("--log-level", choices=levels, default="ERROR")
    a.set_defaults(func=cmd_hil_run_all)
    add_ev_parser(hsub)
