"""A live terminal view of the site, and plain log lines for scripts: both subscribe to the bus.

The view redraws one region of the terminal in place (a :class:`rich.live.Live`), at most a
few times per real second, so a fast simulation neither floods the scrollback nor loses the
lines above it: the header (the simulated devices' endpoints, the metrics URL) stays on screen.
Rendering is pure (``render(event) -> str``, :func:`progress_line`, :func:`sparkline`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO
from zoneinfo import ZoneInfo

from essd.domain import BatteryReading
from essd.events import CycleCompleted, DeviceStateChanged, Event

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live


_BARS = "▁▂▃▄▅▆▇█"
#: Share of overrun cycles above which the speed is too high for this host (the first cycles,
#: which connect to every device, may overrun once or twice on any host).
OVERRUN_WARN_RATIO = 0.05
_MIN_OVERRUNS_FOR_WARNING = 5


def _kw(w: float | None) -> str:
    return "     -" if w is None else f"{w / 1000:6.2f}"


def _local(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz=tz).strftime("%Y-%m-%d %H:%M:%S")


def _hm(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """``values`` as one line of block characters (resampled to at most ``width``), low to
    high; a flat series is drawn at mid height."""
    if not values:
        return ""
    n = len(values)
    if n > width:
        values = [values[i * n // width] for i in range(width)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        return _BARS[len(_BARS) // 2] * len(values)
    top = len(_BARS) - 1
    return "".join(_BARS[round((v - lo) / (hi - lo) * top)] for v in values)


@dataclass(frozen=True, slots=True)
class Progress:
    """A run of ``total_s`` simulated seconds from ``start`` (epoch s) at ``speed``x, started
    at ``wall_start`` (real monotonic s)."""

    start: float
    total_s: float
    speed: float
    wall_start: float


def progress_line(p: Progress, sim_now: float, wall_now: float) -> str:
    """``simulated 02:30 of 24:00 h (10%)  ETA 21m30s at 60x`` (the ETA from the real time
    spent so far, so a host slower than the speed asked shows the truth)."""
    done = min(max(0.0, sim_now - p.start), p.total_s)
    share = done / p.total_s if p.total_s > 0 else 1.0
    spent = max(0.0, wall_now - p.wall_start)
    if done > 0 and spent > 0:
        eta = (p.total_s - done) * spent / done
    else:
        eta = (p.total_s - done) / p.speed
    return (
        f"simulated {_hm(done)} of {_hm(p.total_s)} h ({share:.0%})   "
        f"ETA {_duration(eta)} at {p.speed:g}x"
    )


def overrun_warning(event: CycleCompleted, speed: float) -> str:
    """A warning when more than 5 % of the cycles so far (and at least 5) overran their
    period, else ''."""
    if event.overruns_total < _MIN_OVERRUNS_FOR_WARNING:
        return ""
    if event.overruns_total <= OVERRUN_WARN_RATIO * event.cycle:
        return ""
    return (
        f"WARNING: {event.overruns_total} of {event.cycle} cycles overran their "
        f"{event.period_s:g} s period at {speed:g}x: this host cannot keep up, lower --speed"
    )


def _plan_lines(event: CycleCompleted) -> list[str]:
    plan = event.plan
    if not plan.grid_w:
        return []
    total = [sum(p[k] for p in plan.power_w.values() if k < len(p)) for k in range(plan.steps)]
    hours = plan.steps * plan.step_s / 3600
    lo, hi = min(total), max(total)
    return [
        f"plan, next {hours:g} h  battery {sparkline(total)}  "
        f"{lo / 1000:+.1f}..{hi / 1000:+.1f} kW",
        f"plan, next {hours:g} h  grid    {sparkline(plan.grid_w)}  "
        f"{min(plan.grid_w) / 1000:+.1f}..{max(plan.grid_w) / 1000:+.1f} kW",
    ]


def render(event: CycleCompleted, *, site: str, tz: ZoneInfo, currency: str = "CNY") -> str:
    """The whole screen for one cycle (kW, %, prices per kWh)."""
    plan = event.plan
    t = event.totals
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
            f"so far: imported {t.imported_wh / 1000:.1f} kWh, exported "
            f"{t.exported_wh / 1000:.1f} kWh, cost {t.cost:.2f} {currency}, saved "
            f"{t.savings:.2f} {currency}, CO2 {t.co2_kg:.1f} kg   reserve {event.reserve_soc:.0%}"
        ),
        *_plan_lines(event),
        "",
        f"{'device':<12} {'state':<12} {'SoC':>6} {'power kW':>9} {'setpoint kW':>12} "
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
        lines.append(f"{dev_id:<12} {state.value:<12} {soc:>6} {power:>9} {setpoint:>12} {lim:>14}")
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
    """Redraws one live region from cycle events, at most ``fps`` times per real second.

    ``header`` lines (endpoints, URLs) stay at the top of the region; ``progress`` adds the
    progress line and ``speed`` the overrun warning. Call :meth:`close` at the end: the last
    screen stays where it is and what follows prints below it.
    """

    def __init__(
        self,
        *,
        site: str,
        tz: ZoneInfo,
        currency: str,
        out: TextIO = sys.stdout,
        fps: float = 4,
        progress: Progress | None = None,
    ) -> None:
        self._site, self._tz, self._currency, self._out = site, tz, currency, out
        self._min_gap = 1.0 / fps
        self._last = 0.0
        self._progress = progress
        self.header: list[str] = []
        self._live: Live | None = None
        self._console: Console | None = None
        self._moved: list[tuple[logging.StreamHandler[Any], Any]] = []

    def _start(self) -> Live:
        from rich.console import Console  # noqa: PLC0415 - only when a view is shown
        from rich.live import Live  # noqa: PLC0415

        self._console = Console(file=self._out, highlight=False, soft_wrap=False)
        live = Live(
            console=self._console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=True,
            vertical_overflow="crop",
        )
        live.start()
        # Log lines go above the live region, not through it: the handlers that write to the
        # terminal's stderr write to the live view's stand-in for it while it runs.
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__:
                self._moved.append((h, h.stream))
                h.setStream(sys.stderr)
        self._live = live
        return live

    def screen(self, event: CycleCompleted, *, wall_now: float | None = None) -> str:
        """The text of the region for ``event``."""
        lines = [*self.header]
        if self._progress is not None:
            now = time.monotonic() if wall_now is None else wall_now
            lines.append(progress_line(self._progress, event.time, now))
            warning = overrun_warning(event, self._progress.speed)
            if warning:
                lines.append(warning)
        if lines:
            lines.append("")
        lines.append(render(event, site=self._site, tz=self._tz, currency=self._currency))
        return "\n".join(lines)

    def __call__(self, event: Event) -> None:
        """Bus subscriber."""
        if not isinstance(event, CycleCompleted):
            return
        now = time.monotonic()
        if now - self._last < self._min_gap:
            return
        self._last = now
        from rich.text import Text  # noqa: PLC0415

        live = self._live or self._start()
        live.update(Text(self.screen(event, wall_now=now)), refresh=True)

    def close(self) -> None:
        """Stop redrawing; the last screen stays on the terminal."""
        if self._live is not None:
            for handler, stream in self._moved:
                handler.setStream(stream)
            self._moved.clear()
            self._live.stop()
            self._live = None


class LogLines:
    """Prints a line every ``every`` cycles and every device state change; warns once when
    the cycles overrun at ``speed``."""

    def __init__(
        self, *, tz: ZoneInfo, out: TextIO = sys.stdout, every: int = 1, speed: float = 1.0
    ) -> None:
        self._tz, self._out, self._every, self._speed = tz, out, every, speed
        self._warned = False

    def __call__(self, event: Event) -> None:
        """Bus subscriber."""
        if isinstance(event, CycleCompleted):
            warning = "" if self._warned else overrun_warning(event, self._speed)
            if warning:
                self._warned = True
                self._out.write(warning + "\n")
            if event.cycle % self._every == 0:
                self._out.write(summary_line(event, tz=self._tz) + "\n")
            elif not warning:
                return
        elif isinstance(event, DeviceStateChanged):
            self._out.write(
                f"{_local(event.time, self._tz)} device {event.device_id}: "
                f"{event.old.value} -> {event.new.value} ({event.reason})\n"
            )
        else:
            return
        self._out.flush()
