"""``essd backtest``: replay a measured history through the real controller and score it.

    essd backtest --site SITE.toml --history HISTORY.csv [--from ISO] [--to ISO]
                  [--forecaster site|persistence|learned|true] [--cycle S] [--soc RATIO]
                  [--json OUT] [--report DIR]

Exit 0 on success, 2 for unusable input (configuration, history, options), with a message
naming the file and field (line and column for the history). See docs/backtest.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from essd.backtest.runner import Replay


# --forecaster: the site's own configuration, or one of the built-in comparisons. The
# command line is built without loading the controller (``essd --help`` stays light).
FORECASTERS = ("site", "persistence", "learned", "true")


def _when(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{name}: not ISO 8601: {text!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"--{name}: needs a UTC offset: {text!r}")
    return dt.timestamp()


def run(
    site: Path,
    history_path: Path,
    *,
    start: str | None = None,
    end: str | None = None,
    forecaster: str = "site",
    cycle_s: float | None = None,
    soc0: float = 0.5,
) -> tuple[dict[str, Any], Replay, tuple[int, int]]:
    """Replay and score: the ``--json`` object, the replay and the scored step range.

    Raises ConfigError, HistoryError, ProfileError or ValueError for unusable input.
    """
    from essd.backtest.history import read_history  # noqa: PLC0415 - heavy, see FORECASTERS
    from essd.backtest.results import score_replay  # noqa: PLC0415
    from essd.backtest.runner import replay  # noqa: PLC0415
    from essd.config_loading import load_settings  # noqa: PLC0415

    settings = load_settings(site)
    history = read_history(history_path)
    t0, t1 = _when(start, "from"), _when(end, "to")
    i0 = 0 if t0 is None else history.index(t0)
    i1 = history.steps if t1 is None else history.index(t1)
    if i1 - i0 < 1:
        raise ValueError("--from/--to: the scored window holds no step of the history")
    if not 0.0 <= soc0 <= 1.0:
        raise ValueError(f"--soc: must be a ratio 0..1, got {soc0!r}")
    started = time.perf_counter()
    result = replay(settings, history, forecaster=forecaster, cycle_s=cycle_s, soc0=soc0)
    scored = score_replay(result, i0, i1)
    result.wall_s = time.perf_counter() - started
    scored["wall_s"] = result.wall_s
    scored["forecaster"] = forecaster
    return scored, result, (i0, i1)


def _cmd(args: argparse.Namespace) -> int:
    from drivers.profile import ProfileError  # noqa: PLC0415 - heavy, see FORECASTERS
    from essd.backtest.history import HistoryError  # noqa: PLC0415
    from essd.backtest.report import write_report  # noqa: PLC0415
    from essd.config_loading import ConfigError  # noqa: PLC0415

    logging.basicConfig(level=logging.ERROR)
    try:
        out, result, (i0, i1) = run(
            args.site,
            args.history,
            start=args.start,
            end=args.end,
            forecaster=args.forecaster,
            cycle_s=args.cycle,
            soc0=args.soc,
        )
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except (HistoryError, ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    share = out["savings_share"]
    print(
        f"{out['start']} .. {out['end']}: cost {out['cost']:.2f}, no battery "
        f"{out['baseline_cost']:.2f}, optimum {out['optimal_cost']:.2f}; savings "
        f"{out['savings']:.2f} of {out['optimal_savings']:.2f} possible"
        + (f" ({share:.1%})" if share is not None else "")
        + f"; {out['wall_s']:.1f} s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.report is not None:
        for path in write_report(result, args.report, i0, i1):
            print(path)
    return 0


def register_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``essd backtest``."""
    p = sub.add_parser(
        "backtest",
        help="replay a measured history through the controller and score it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--site", type=Path, required=True, help="site configuration (TOML)")
    p.add_argument("--history", type=Path, required=True, help="HISTORY.csv")
    p.add_argument("--from", dest="start", help="start of the scored window (ISO 8601)")
    p.add_argument("--to", dest="end", help="end of the scored window (ISO 8601, exclusive)")
    p.add_argument("--forecaster", choices=FORECASTERS, default="site", help="(site)")
    p.add_argument("--cycle", type=float, default=None, help="cycle period, s (one per step)")
    p.add_argument("--soc", type=float, default=0.5, help="SoC of every unit at the start (0.5)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--report", type=Path, default=None, help="write steps.csv and plots here")
    p.set_defaults(func=_cmd)
