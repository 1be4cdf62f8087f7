"""``--report DIR``: the per-step CSV and the plots of a backtest.

``steps.csv``: time, load_w, pv_w, each unit's power_w and SoC at the step's start, grid_w,
baseline_grid_w, curtailed_w, import_price, export_price, rung (the worst in the step).
``backtest.png`` (with matplotlib, the ``plots`` extra): on one clock-time axis, load and PV;
each unit's power and SoC; grid with and without the battery with the billed (15-minute
average) import and the running peak; prices.

Battery W > 0 discharges; grid W > 0 imports.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from essd.backtest.runner import Replay


def write_report(replay: Replay, directory: Path, i0: int, i1: int) -> list[Path]:
    """Write the report files for steps ``i0 .. i1-1``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    tz = ZoneInfo(replay.settings.site.timezone)
    h = replay.history
    ids = list(replay.power_w)
    path = directory / "steps.csv"
    worst = np.array(
        [max((r for r in range(1, 6) if row[r]), default=0) for row in replay.rung_cycles]
    )
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(
            [
                "time",
                "load_w",
                "pv_w",
                *[f"{i}_power_w" for i in ids],
                *[f"{i}_soc" for i in ids],
                "grid_w",
                "baseline_grid_w",
                "curtailed_w",
                "import_price",
                "export_price",
                "rung",
            ]
        )
        for k in range(i0, i1):
            w.writerow(
                [
                    datetime.fromtimestamp(float(h.times[k]), tz=tz).isoformat(),
                    f"{h.columns['load_w'][k]:.1f}",
                    f"{h.columns['pv_w'][k]:.1f}",
                    *[f"{replay.power_w[i][k]:.1f}" for i in ids],
                    *[f"{replay.soc[i][k]:.4f}" for i in ids],
                    f"{replay.grid_w[k]:.1f}",
                    f"{replay.baseline_w[k]:.1f}",
                    f"{replay.curtailed_w[k]:.1f}",
                    f"{replay.prices.import_price[k]:.4f}",
                    f"{replay.prices.export_price[k]:.4f}",
                    int(worst[k]),
                ]
            )
    written = [path]
    plot = _plot(replay, directory / "backtest.png", i0, i1, tz)
    if plot is not None:
        written.append(plot)
    return written


def _plot(replay: Replay, path: Path, i0: int, i1: int, tz: ZoneInfo) -> Path | None:
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional (the plots extra)

        mpl.use("Agg")
        import matplotlib.dates as mdates  # noqa: PLC0415
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    h = replay.history
    times = [datetime.fromtimestamp(float(t), tz=tz) for t in h.times[i0:i1]]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(14, 11))
    ax = axes[0]
    ax.plot(times, h.columns["load_w"][i0:i1] / 1e3, label="load", lw=0.8)
    ax.fill_between(times, h.columns["pv_w"][i0:i1] / 1e3, alpha=0.4, color="gold", label="PV")
    ax.set_ylabel("kW")
    ax.legend(loc="upper right")
    ax = axes[1]
    for i, p in replay.power_w.items():
        ax.plot(times, p[i0:i1] / 1e3, lw=0.8, label=f"{i} power (+ discharge)")
    ax.set_ylabel("kW")
    twin = ax.twinx()
    for i, s in replay.soc.items():
        twin.plot(times, s[i0:i1], "--", lw=0.8, label=f"{i} SoC")
    twin.set_ylim(0, 1)
    twin.set_ylabel("SoC")
    ax.legend(loc="upper left")
    ax = axes[2]
    grid = replay.grid_w[i0:i1] / 1e3
    base = replay.baseline_w[i0:i1] / 1e3
    ax.plot(times, base, lw=0.6, color="grey", label="grid without battery")
    ax.plot(times, grid, lw=0.8, label="grid with battery (+ import)")
    billed = _billed(replay, i0, i1)
    ax.step(times, billed / 1e3, where="post", lw=0.8, label="billed 15-min average import")
    ax.plot(times, np.maximum.accumulate(billed) / 1e3, "r-", lw=1.0, label="running peak")
    ax.set_ylabel("kW")
    ax.legend(loc="upper right")
    ax = axes[3]
    ax.step(times, replay.prices.import_price[i0:i1], where="post", label="import price")
    ax.step(times, replay.prices.export_price[i0:i1], where="post", label="export price")
    ax.set_ylabel("per kWh")
    ax.legend(loc="upper right")
    formatter: Any = mdates.DateFormatter
    axes[-1].xaxis.set_major_formatter(formatter("%m-%d %H:%M", tz=tz))
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _billed(replay: Replay, i0: int, i1: int) -> np.ndarray:
    """The billing-window average import covering each step, W."""
    window = replay.prices.billing_window_s
    t = replay.history.times[i0:i1]
    imp = np.maximum(replay.grid_w[i0:i1], 0.0)
    keys = t - (t % window)
    out = np.empty_like(imp)
    for key in np.unique(keys):
        sel = keys == key
        out[sel] = imp[sel].mean()
    return out
