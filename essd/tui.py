"""A live terminal view of the site, and plain log lines for scripts: both subscribe to the bus.

Rendering is pure (``render(event) -> str``); :class:`TerminalView` redraws at most a few times
per real second so a fast simulation does not flood the terminal.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TextIO
from zoneinfo import ZoneInfo

from essd.domain import BatteryReading
from essd.events import CycleCompleted, DeviceStateChanged, Event

__all__ = ["LogLines", "TerminalView", "render", "summary_line"]

_CLEAR = "\x1b[H\x1b[2J"


def _kw(w: float | None) -> str:
    return "     -" if w is None else f"{w / 1000:6.2f}"


def _local(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz=tz).strftime("%Y-%m-%d %H:%M:%S")


def render(event: CycleCompleted, *, site: str, tz: ZoneInfo, currency: str = "CNY") -> str:
    """The whole screen for one cycle (kW, %, prices per kWh)."""
    plan = event.plan
    lines = [
        f"essd  site {site}   {_local(event.time, tz)}   cycle {event.cycle}   mode {event.mode}",
        (
            f"grid {_kw(event.grid_power_w)} kW  (import <= {event.import_limit_w / 1000:.1f}, "
            f"export <= {event.export_limit_w / 1000:.1f} kW)   price "
            f"{event.import_price:.2f}/{event.export_price:.2f} {currency}/kWh   "
            f"carbon {event.carbon_intensity_g_per_kwh:.0f} g/kWh"
        ),
        (
            f"rung {int(plan.rung)} {plan.rung.name.lower()} ({plan.reason or plan.solver_status})"
            f"   solve {plan.solve_s * 1000:.1f} ms   cycle {event.duration_s * 1000:.1f} ms"
            f"   overruns {event.overruns_total}"
        ),
        (
            f"so far: imported {event.totals.imported_wh / 1000:.1f} kWh, exported "
            f"{event.totals.exported_wh / 1000:.1f} kWh, cost {event.totals.cost:.2f} {currency},"
            f" CO2 {event.totals.co2_kg:.1f} kg   reserve {event.reserve_soc:.0%}"
        ),
        "",
        f"{'device':<12} {'state':<10} {'SoC':>6} {'power kW':>9} {'setpoint kW':>12} "
        f"{'max ch/dis kW':>14}",
    ]
    for dev_id, state in event.device_states.items():
        r = event.snapshot.batteries.get(dev_id)
        sp = event.setpoints.get(dev_id)
        if isinstance(r, BatteryReading):
            soc = f"{r.soc.value:6.1%}" if r.soc.value is not None else "     -"
            lim = (
                f"{r.limits.max_charge_w / 1000:6.2f}/{r.limits.max_discharge_w / 1000:<6.2f}"
                if r.limits is not None
                else "-"
            )
            power = _kw(r.power_w.value)
        else:
            soc, lim, power = "     -", "-", "     -"
            if dev_id == (event.snapshot.meter.device_id if event.snapshot.meter else None):
                power = _kw(event.grid_power_w)
        setpoint = _kw(sp.power_w) if sp is not None else "     -"
        lines.append(f"{dev_id:<12} {state.value:<10} {soc:>6} {power:>9} {setpoint:>12} {lim:>14}")
    lines.append("")
    lines.append("battery power > 0 discharges, grid power > 0 imports.  Ctrl-C stops.")
    return "\n".join(lines)


def summary_line(event: CycleCompleted, *, tz: ZoneInfo) -> str:
    """One log line per cycle, for --no-tui."""
    devices = " ".join(f"{d}={s.power_w / 1000:+.2f}kW" for d, s in sorted(event.setpoints.items()))
    socs = " ".join(
        f"{d}:{r.soc.value:.0%}"
        for d, r in sorted(event.snapshot.batteries.items())
        if r.soc.value is not None
    )
    return (
        f"{_local(event.time, tz)} cycle={event.cycle} grid={_kw(event.grid_power_w).strip()}kW "
        f"price={event.import_price:.2f} rung={int(event.plan.rung)} "
        f"solve_ms={event.plan.solve_s * 1000:.1f} cycle_ms={event.duration_s * 1000:.1f} "
        f"setpoints[{devices}] soc[{socs}]"
    )


class TerminalView:
    """Redraws the screen from cycle events, at most ``fps`` times per real second."""

    def __init__(
        self, *, site: str, tz: ZoneInfo, currency: str, out: TextIO = sys.stdout, fps: float = 4
    ) -> None:
        self._site, self._tz, self._currency, self._out = site, tz, currency, out
        self._min_gap = 1.0 / fps
        self._last = 0.0

    def __call__(self, event: Event) -> None:
        """Bus subscriber."""
        if not isinstance(event, CycleCompleted):
            return
        now = time.monotonic()
        if now - self._last < self._min_gap:
            return
        self._last = now
        screen = render(event, site=self._site, tz=self._tz, currency=self._currency)
        self._out.write(_CLEAR + screen + "\n")
        self._out.flush()


class LogLines:
    """Prints a line every ``every`` cycles and every device state change."""

    def __init__(self, *, tz: ZoneInfo, out: TextIO = sys.stdout, every: int = 1) -> None:
        self._tz, self._out, self._every = tz, out, every

    def __call__(self, event: Event) -> None:
        """Bus subscriber."""
        if isinstance(event, CycleCompleted) and event.cycle % self._every == 0:
            self._out.write(summary_line(event, tz=self._tz) + "\n")
        elif isinstance(event, DeviceStateChanged):
            self._out.write(
                f"{_local(event.time, self._tz)} device {event.device_id}: "
                f"{event.old.value} -> {event.new.value} ({event.reason})\n"
            )
        else:
            return
        self._out.flush()
