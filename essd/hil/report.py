"""The report of a HIL run: ``kpis.json``, PNG plots and a short Markdown page embedding them.

Plots are drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot
state, safe in tests and on a headless gateway): SoC per device, power per device, grid power
with the site limits and the no-battery baseline, and prices with the grid's carbon intensity.
Every axis carries its unit; fault windows are shaded.

Battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from essd.hil.foresight import cost_model
from essd.hil.kpi import baseline_grid_w
from essd.hil.runner import RunResult

PLOTS = ("soc", "power", "grid", "price", "peak")


def _hours(result: RunResult) -> list[float]:
    start = result.scenario.start_epoch
    return [(s.time - start) / 3600.0 for s in result.samples]


def _shade_faults(ax: Axes, result: RunResult) -> None:
    for i, f in enumerate(result.scenario.faults):
        ax.axvspan(
            f.at / 3600.0,
            f.end / 3600.0,
            color="tab:red",
            alpha=0.12,
            label="fault window" if i == 0 else None,
        )


def _axes(title: str, ylabel: str, result: RunResult) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency, loaded late

    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"{result.scenario.name}: {title}")
    ax.set_xlabel(f"Time from start (h, start {result.scenario.start.isoformat()})")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    _shade_faults(ax, result)
    return fig, ax


def make_figures(result: RunResult) -> dict[str, Figure]:
    """The four report figures, by name (see :data:`PLOTS`)."""
    x = _hours(result)
    samples = result.samples
    devices = sorted(samples[0].truth.batteries) if samples else []
    figs: dict[str, Figure] = {}

    fig, ax = _axes("state of charge per device", "State of charge (%)", result)
    for dev in devices:
        (line,) = ax.step(
            x, [s.truth.batteries[dev].soc * 100 for s in samples], where="post", label=dev
        )
        lo = result.limits.reserve_soc.get(dev)
        hi = result.limits.max_soc.get(dev)
        for v, name in ((lo, "reserve"), (hi, "max")):
            if v is not None:
                ax.axhline(v * 100, color=line.get_color(), ls=":", lw=1, label=f"{dev} {name}")
    ax.set_ylim(0, 100)
    ax.legend(loc="best", fontsize="small", ncols=2)
    figs["soc"] = fig

    fig, ax = _axes("battery power per device", "Power (kW, > 0 discharges)", result)
    for dev in devices:
        (line,) = ax.step(
            x,
            [s.truth.batteries[dev].power_w / 1000 for s in samples],
            where="post",
            label=f"{dev} actual",
        )
        ax.step(
            x,
            [s.truth.batteries[dev].commanded_w / 1000 for s in samples],
            where="post",
            ls="--",
            lw=0.8,
            color=line.get_color(),
            label=f"{dev} commanded",
        )
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(loc="best", fontsize="small", ncols=2)
    figs["power"] = fig

    fig, ax = _axes("grid power at the connection", "Grid power (kW, > 0 imports)", result)
    model = cost_model(result.scenario, result.settings)
    ax.step(x, [s.truth.grid_w / 1000 for s in samples], where="post", label="grid (with essd)")
    ax.step(
        x,
        [baseline_grid_w(s.truth, model) / 1000 for s in samples],
        where="post",
        ls=":",
        color="tab:gray",
        label="grid without battery",
    )
    ax.axhline(result.limits.import_w / 1000, color="tab:red", ls="--", label="import limit")
    if math.isfinite(result.limits.export_w):
        ax.axhline(
            -result.limits.export_w / 1000, color="tab:purple", ls="--", label="export limit"
        )
    ax.legend(loc="best", fontsize="small", ncols=2)
    figs["grid"] = fig

    cur = result.currency
    fig, ax = _axes("prices and grid carbon intensity", f"Price ({cur}/kWh)", result)
    ax.step(x, [s.import_price for s in samples], where="post", label="import price")
    ax.step(x, [s.export_price for s in samples], where="post", label="export price")
    ax.axhline(0, color="black", lw=0.5)
    ax2 = ax.twinx()
    ax2.step(
        x,
        [s.carbon_g_per_kwh for s in samples],
        where="post",
        color="tab:green",
        ls=":",
        label="carbon intensity",
    )
    ax2.set_ylabel("Grid carbon intensity (g CO2/kWh)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize="small")
    figs["price"] = fig
    figs["peak"] = _peak_figure(result)
    return figs


def _billed(samples: Sequence[Any], window_s: float, grid: Sequence[float]) -> list[float]:
    """Per sample, the average import (W) over the billing window that holds it."""
    sums: dict[float, list[float]] = {}
    for smp, g in zip(samples, grid, strict=True):
        acc = sums.setdefault(smp.time - smp.time % window_s, [0.0, 0.0])
        acc[0] += max(g, 0.0) * smp.dt_s
        acc[1] += smp.dt_s
    return [
        sums[smp.time - smp.time % window_s][0] / max(sums[smp.time - smp.time % window_s][1], 1e-9)
        for smp in samples
    ]


def _peak_figure(result: RunResult) -> Figure:
    """Load and PV above the billed import (the billing window's average), the running peak
    of the billing period and the same without the battery, on one clock-time axis."""
    from matplotlib.dates import DateFormatter  # noqa: PLC0415 - optional dependency
    from matplotlib.figure import Figure  # noqa: PLC0415

    samples = result.samples
    tz = result.scenario.start.tzinfo
    when = [datetime.fromtimestamp(smp.time, tz=tz) for smp in samples]
    model = cost_model(result.scenario, result.settings)
    window = model.demand_window_s
    fig = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set_title(f"{result.scenario.name}: load, PV and the billed import")
    top.step(when, [smp.truth.load_w / 1000 for smp in samples], where="post", label="load")
    top.step(when, [smp.truth.pv_w / 1000 for smp in samples], where="post", label="PV")
    top.set_ylabel("Power (kW)")
    top.legend(loc="best", fontsize="small")
    billed = _billed(samples, window, [smp.truth.grid_w for smp in samples])
    base = _billed(samples, window, [baseline_grid_w(smp.truth, model) for smp in samples])
    minutes = f"{window / 60:g}-minute"
    bottom.step(when, [b / 1000 for b in billed], where="post", label=f"billed {minutes} import")
    bottom.step(
        when,
        [b / 1000 for b in base],
        where="post",
        ls=":",
        color="tab:gray",
        label="the same without battery",
    )
    running = [max(billed[: k + 1]) / 1000 for k in range(len(billed))]
    bottom.step(when, running, where="post", color="tab:red", label="billing period's peak")
    bottom.axhline(
        max(base, default=0.0) / 1000,
        color="tab:gray",
        ls="--",
        lw=0.8,
        label="peak without battery",
    )
    bottom.set_ylabel("Import (kW)")
    bottom.set_xlabel(f"Local time ({result.scenario.start.tzname()})")
    bottom.legend(loc="best", fontsize="small")
    formatter: Any = DateFormatter
    bottom.xaxis.set_major_formatter(formatter("%H:%M", tz=tz))
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return fig


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _markdown(result: RunResult) -> str:
    k = result.kpis
    cur = result.currency
    sc = result.scenario
    status = "PASS" if result.passed else "FAIL"
    lines = [
        f"# HIL scenario `{sc.name}`: {status}",
        "",
        sc.description,
        "",
        f"Start {sc.start.isoformat()}, {k.simulated_s / 3600:.1f} h simulated in "
        f"{k.wall_s:.1f} s wall, {k.cycles} cycles of {sc.cycle_period:g} s.",
        "",
    ]
    if result.failures:
        lines += ["## Failed expectations", ""]
        lines += [f"- {f}" for f in result.failures]
        lines.append("")
    lines += [
        "## Key figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| cost | {_fmt(k.cost)} {cur} |",
        f"| cost without battery | {_fmt(k.baseline_cost)} {cur} |",
        f"| savings (corrected for stored energy) | {_fmt(k.savings)} {cur} |",
        f"| uncorrected savings (baseline - cost) | {_fmt(k.uncorrected_savings)} {cur} |",
        f"| perfect-foresight optimum | {_fmt(k.optimum_cost)} {cur} ({k.optimum_status}) |",
        f"| optimum to the run's final SoC | {_fmt(k.optimum_cost_to_end_soc)} {cur} |",
        f"| share of achievable savings | {_fmt(k.savings_vs_optimum, 3)} |",
        f"| peak import | {_fmt(k.peak_import_w / 1000)} kW |",
        f"| imported / exported | {_fmt(k.imported_wh / 1000)} / "
        f"{_fmt(k.exported_wh / 1000)} kWh |",
        f"| PV self-consumption | {_fmt(k.self_consumption_ratio, 3)} "
        f"(without battery {_fmt(k.baseline_self_consumption_ratio, 3)}) |",
        f"| PV used / curtailed | {_fmt(k.pv_wh / 1000)} / {_fmt(k.pv_curtailed_wh / 1000)} kWh |",
        f"| CO2 | {_fmt(k.co2_kg)} kg (without battery {_fmt(k.baseline_co2_kg)}) |",
        f"| battery throughput | {_fmt(k.battery_throughput_wh / 1000)} kWh, "
        f"{_fmt(k.equivalent_full_cycles, 3)} equivalent full cycles |",
        f"| limit violations | {k.violations} {dict(k.violations_by_kind) or ''} |",
        f"| unsafe setpoints written | {k.unsafe_writes} |",
        f"| fallback rungs (cycles) | {dict(k.rung_counts)} |",
        f"| Modbus errors / device writes | {k.modbus_errors} / {k.device_writes} |",
        "",
    ]
    if k.faults:
        lines += [
            "## Faults",
            "",
            "| # | kind | device | at | for | plan rungs | device states | setpoint sources "
            "| cycles at safe idle | max setpoint | unsafe writes | all units at 0 W after "
            "| running again after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for f in k.faults:
            rec = f["recovered_after_s"]
            safe = f.get("safe_after_s")
            lines.append(
                f"| {f['index']} | {f['kind']} | {f['device']} | {f['at_s'] / 3600:.2f} h "
                f"| {f['duration_s'] / 60:.0f} min | {f['rungs']} | "
                f"{', '.join(f['device_states'])} | {', '.join(f['setpoint_sources'])} | "
                f"{f['safe_idle_cycles']}/{f['cycles']} | "
                f"{f['setpoint_w_max']:.0f} W | {len(f['unsafe_writes'])} | "
                f"{_seconds(safe)} | {_seconds(rec)} |"
            )
        lines.append("")
    lines += _events_section(k.events)
    if k.daemon_totals:
        t = k.daemon_totals
        lines += [
            "## What essd counted (its durable totals, against the truth above)",
            "",
            "| figure | essd | truth |",
            "|---|---|---|",
            f"| imported | {_fmt(t.get('imported_wh', 0.0) / 1000)} kWh "
            f"| {_fmt(k.imported_wh / 1000)} kWh |",
            f"| exported | {_fmt(t.get('exported_wh', 0.0) / 1000)} kWh "
            f"| {_fmt(k.exported_wh / 1000)} kWh |",
            f"| energy and carbon cost | {_fmt(t.get('cost', 0.0))} {cur} "
            f"| {_fmt(k.energy_cost + k.carbon_cost)} {cur} |",
            f"| billing peak (per-step average import) | "
            f"{_fmt(t.get('billing_peak_w', 0.0) / 1000)} kW "
            f"| {_fmt(k.peak_window_import_w / 1000)} kW |",
            "",
        ]
    lines += ["## Plots", ""]
    lines += [f"![{name}]({name}.png)" for name in PLOTS]
    lines.append("")
    return "\n".join(lines)


def _seconds(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} s"


def _events_section(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runner-level events (wall-clock steps, signals, commands) as a table."""
    if not events:
        return []
    lines = [
        "## Events",
        "",
        "| # | event | what | at | plan rungs | causes | device states | all units at 0 W after "
        "| running again after | details |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in events:
        details = ""
        if e["kind"] == "signal":
            stop = e.get("safe_stop", {})
            acked = ", ".join(f"{d} {'ok' if ok else 'NOT acknowledged'}" for d, ok in stop.items())
            details = (
                f"safe stop: {acked or 'no units'}; restarted after "
                f"{_seconds(e.get('restarted_after_s'))}"
                + (f"; restore failed: {e['restore_error']}" if e.get("restore_error") else "")
            )
        elif e["kind"] == "command":
            r = e["replies"]
            refused = "; ".join(f"{n}x {err}" for err, n in r["refused"].items())
            details = f"{r['total']} replies, {r['ok']} ok" + (
                f"; refused: {refused}" if refused else ""
            )
        lines.append(
            f"| {e['index']} | {e['kind']} | {e['what']} | {e['at_s'] / 3600:.2f} h | {e['rungs']} "
            f"| {', '.join(e['causes'])} | {', '.join(e['device_states'])} "
            f"| {_seconds(e['safe_after_s'])} | {_seconds(e['recovered_after_s'])} | {details} |"
        )
    lines.append("")
    return lines


def write_report(result: RunResult, directory: Path) -> Path:
    """Write kpis.json, cycles.csv, the PNG plots and report.md into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        **result.kpis.to_json(),
        "passed": result.passed,
        "failures": result.failures,
        "currency": result.currency,
    }
    (directory / "kpis.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with (directory / "cycles.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["cycle", "time", "rung", "cause", "reason", "grid_belief_w", "faults", "setpoints_w"]
        )
        for c in result.cycles:
            w.writerow(
                [
                    c.cycle,
                    f"{c.time:.0f}",
                    c.rung,
                    c.cause,
                    c.reason,
                    "" if c.grid_belief_w is None else f"{c.grid_belief_w:.0f}",
                    " ".join(c.active_faults),
                    " ".join(f"{d}={p:.0f}" for d, p in sorted(c.setpoints_w.items())),
                ]
            )
    for name, fig in make_figures(result).items():
        fig.savefig(directory / f"{name}.png")
    path = directory / "report.md"
    path.write_text(_markdown(result), encoding="utf-8")
    return path
