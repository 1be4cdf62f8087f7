"""``essd backtest`` on the shipped example histories (profiles/backtest/): the share of the
perfect-foresight optimum's savings captured over the last 14 days (a billing month of its own
from 1 June), with persistence, the learned built-in forecasters and the true series as the
forecast, and the wall time of replaying 28 days at 15-minute steps.

Figures: ``backtest.<site>.<forecaster>.savings_share`` (ratio, savings corrected for stored
energy, docs/backtest.md) with one cycle per 15-minute step, ``backtest.<site>.learned_5min``
the learned forecasters with a cycle every 5 minutes and ``backtest.<site>.<forecaster>_1min``
each forecaster with a cycle every minute (``--cycle 300``/``60``: from the second cycle of a
step the controller has seen that step, as the daemon cycling every 10 s has; a minute is as
close to it as a bench run of 28 days affords), and ``backtest.wall_s.28d`` (s, the household
replayed with the learned forecasters at one cycle per step, scoring included).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import Result
from essd.backtest.cli import run as backtest

ROOT = Path(__file__).parents[1] / "profiles" / "backtest"
SITES = ("household", "commercial")
# (figure name, --forecaster, --cycle)
RUNS = (
    ("persistence", "persistence", None),
    ("learned", "learned", None),
    ("true", "true", None),
    ("learned_5min", "learned", 300.0),
    ("persistence_1min", "persistence", 60.0),
    ("learned_1min", "learned", 60.0),
    ("true_1min", "true", 60.0),
)
SCORED_FROM = "2025-06-01T00:00:00+02:00"


def run() -> list[Result]:
    """Replay every site with every forecaster."""
    results: list[Result] = []
    for site in SITES:
        for name, forecaster, cycle_s in RUNS:
            out, replay, _ = backtest(
                ROOT / f"{site}.toml",
                ROOT / f"{site}.csv",
                start=SCORED_FROM,
                forecaster=forecaster,
                cycle_s=cycle_s,
            )
            share = out["savings_share"]
            results.append(
                Result(
                    f"backtest.{site}.{name}.savings_share",
                    float("nan") if share is None else float(share),
                    "ratio",
                )
            )
            if site == "household" and name == "learned":
                days = replay.history.steps * replay.history.step_s / 86_400.0
                assert abs(days - 28.0) < 1e-9, days
                results.append(Result("backtest.wall_s.28d", out["wall_s"], "s"))
    return results
