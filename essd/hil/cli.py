"""``essd hil run SCENARIO``, ``essd hil run-all DIR`` and ``essd hil ev SCENARIO.yaml...
[--report FILE]`` (EV / swap-station scenarios against their baselines, a Markdown report).

Exit codes as the rest of ``essd``: 0 every expectation held, 1 an expectation failed (each
named on stderr), 2 invalid input (a scenario that does not validate, naming file and field).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from essd.events import CycleCompleted
    from essd.hil.ev_report import Comparison
    from essd.hil.ev_scenario import EvScenario


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def _err(message: str) -> None:
    print(message, file=sys.stderr)


class RunProgress:
    """Progress of one scenario on stderr: redrawn in place on a terminal (at most 4 times a
    real second), else one line per 10 % of the simulated duration."""

    def __init__(
        self, name: str, start: float, duration_s: float, *, out: TextIO | None = None
    ) -> None:
        self._name, self._start, self._duration = name, start, duration_s
        out = sys.stderr if out is None else out  # the stream in force now, not at import
        self._out = out
        self._tty = out.isatty()
        self._wall0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self.drawn = 0

    def line(self, sim_now: float, wall_now: float) -> str:
        """``<name>: simulated 6.0 of 24.0 h (25%), 3 s wall, ETA 9 s``."""
        done = min(max(0.0, sim_now - self._start), self._duration)
        share = done / self._duration
        spent = max(0.0, wall_now - self._wall0)
        eta = f", ETA {spent / share - spent:.0f} s" if share > 0 else ""
        return (
            f"{self._name}: simulated {done / 3600:.1f} of {self._duration / 3600:.1f} h "
            f"({share:.0%}), {spent:.0f} s wall{eta}"
        )

    def __call__(self, event: CycleCompleted) -> None:
        """A cycle ended: show the progress if it is time to."""
        now = time.perf_counter()
        decile = int(10 * min(1.0, max(0.0, event.time - self._start) / self._duration))
        if self._tty:
            if now - self._last_draw < 0.25:
                return
            self._last_draw = now
            self._out.write("\r\x1b[2K" + self.line(event.time, now))
        else:
            if decile <= self._last_decile:
                return
            self._last_decile = decile
            self._out.write(self.line(event.time, now) + "\n")
        self.drawn += 1
        self._out.flush()

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self._tty and self.drawn:
            self._out.write("\r\x1b[2K")
            self._out.flush()


def _run_one(path: Path, report: Path | None) -> tuple[int, dict[str, object]]:
    """Run one scenario file; (exit code, table row)."""
    import asyncio  # noqa: PLC0415 - `essd --help` registers this module: keep it light

    from drivers.profile import ProfileError  # noqa: PLC0415 - heavy imports only when running
    from essd.hil.report import write_report  # noqa: PLC0415
    from essd.hil.runner import run_scenario  # noqa: PLC0415
    from essd.hil.scenario import ScenarioError, load_scenario  # noqa: PLC0415

    row: dict[str, object] = {"name": path.stem, "result": "invalid"}
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
            progress = RunProgress(scenario.name, scenario.start_epoch, scenario.duration)
            try:
                result = asyncio.run(
                    run_scenario(scenario, settings, workdir=workdir, progress=progress)
                )
            finally:
                progress.close()
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
        wall_s=k.wall_s,  # the run's one wall time, as in kpis.json and the report
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
    """``essd hil ev SCENARIO... [--report FILE]``: each scenario optimized and as its baseline,
    the Markdown report on stdout (or in FILE)."""
    from essd.hil.ev_report import render  # noqa: PLC0415 - heavy imports only when running
    from essd.hil.ev_scenario import EvScenarioError, load_ev_scenario  # noqa: PLC0415

    try:
        scenarios = [load_ev_scenario(p) for p in args.scenarios]
    except EvScenarioError as exc:
        _err(str(exc))
        return EXIT_INVALID
    comparisons = [compare(sc) for sc in scenarios]
    text = render(comparisons) + "\n"
    if args.report is not None:
        args.report.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_FAILED if any(c.failures for c in comparisons) else EXIT_OK


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
    e = hsub.add_parser("ev", help="run EV / swap-station scenarios against their baselines")
    e.add_argument("scenarios", nargs="+", type=Path, help="scenario YAML files (scenarios/ev)")
    e.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    e.set_defaults(func=cmd_hil_ev)
