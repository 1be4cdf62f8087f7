"""What the site did, added up: energy, cost and carbon totals and the billing period's peak.

Intervals come from the monotonic clock, so a wall-clock step neither adds nor removes
energy; the wall clock only says which billing period and demand window it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from essd.cycle.energy import step_cost
from essd.cycle.forecasting import measured_pv
from essd.cycle.plan_codec import number, obj, optional_number
from essd.domain import Snapshot
from essd.events import SiteTotals
from essd.forecast import Forecast, billing_period_start

# Longest interval integrated into the totals at once: a gap longer than this (the process
# was stopped, the host suspended) is not energy essd saw.
MAX_INTEGRATION_S = 900.0


class PeakTracker:
    """The billing period's running peak of the average grid import over clock-aligned windows
    of ``window_s`` (the demand charge's billed quantity)."""

    def __init__(self, window_s: float, tz: ZoneInfo) -> None:
        self._window_s = window_s
        self._tz = tz
        self.peak_w = 0.0
        self._window_start: float | None = None
        self._wh = 0.0
        self._s = 0.0  # seconds of the current window measured
        self._period: float | None = None

    def state(self) -> dict[str, Any]:
        """The tracker as plain data for the durable state."""
        return {
            "period": self._period,
            "peak_w": self.peak_w,
            "window_start": self._window_start,
            "window_wh": self._wh,
            "window_s": self._s,
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""
        period = optional_number(data, "period")
        window = optional_number(data, "window_start")
        peak = number(data, "peak_w")
        wh = number(data, "window_wh")
        # Absent from a state written before it was kept: the window's energy then counts as
        # measured in no time (the rest is planned as a whole window on top: conservative).
        seconds = number(data, "window_s") if "window_s" in data else 0.0
        if peak < 0 or wh < 0 or seconds < 0:
            raise ValueError("peak_w, window_wh, window_s: must be >= 0")
        if window is not None and window % self._window_s:
            # Saved with another window length: the window under way is not one of ours.
            window, wh, seconds = None, 0.0, 0.0
        self._period, self._window_start, self.peak_w, self._wh = period, window, peak, wh
        self._s = seconds

    def add(self, t: float, grid_w: float, dt_s: float) -> None:
        """Add ``dt_s`` seconds at ``grid_w`` ending at wall time ``t``.

        The interval ``[t - dt_s, t]`` is split at the clock-aligned windows it spans: with
        cycles shorter than a window, the cycle at a window's start reports the end of the
        window before, which belongs to that one.
        """
        period = billing_period_start(t, self._tz)
        if period != self._period:
            self._period, self.peak_w = period, 0.0
        a = t - max(0.0, dt_s)
        while a < t:
            window = a - (a % self._window_s)
            b = min(t, window + self._window_s)
            if window != self._window_start:
                if self._window_start is not None:
                    self.peak_w = max(self.peak_w, self._wh * 3600.0 / self._window_s)
                self._window_start, self._wh, self._s = window, 0.0, 0.0
            self._wh += max(0.0, grid_w) * (b - a) / 3600.0
            self._s += b - a
            a = b

    def so_far(self, t: float, pending_w: float | None, pending_s: float) -> tuple[float, float]:
        """Energy imported (Wh) and seconds measured in the window under way at wall time
        ``t``, including ``pending_s`` seconds at ``pending_w`` ending at ``t`` that are not
        added yet (None: nothing pending)."""
        window = t - (t % self._window_s)
        wh, s = (self._wh, self._s) if window == self._window_start else (0.0, 0.0)
        if pending_w is not None:
            part = min(max(0.0, pending_s), t - window)
            wh += max(0.0, pending_w) * part / 3600.0
            s += part
        # A window is at most one step: never report more (rounding of wall times).
        return wh, min(s, t - window)


class Accounting:
    """The site's totals and billing peak, integrated cycle by cycle."""

    def __init__(self, window_s: float, tz: ZoneInfo, carbon_price_per_kg: float) -> None:
        self._window_s = window_s
        self._tz = tz
        self._carbon_price = carbon_price_per_kg
        self.totals = SiteTotals()
        self.peak = PeakTracker(window_s, tz)
        #: Per unit: (charged, discharged) AC energy, Wh; durable like the totals.
        self.unit_wh: dict[str, tuple[float, float]] = {}
        self._last_mono: float | None = None

    def state(self) -> dict[str, Any]:
        """Totals and peak as plain data for the durable state."""
        return {
            "totals": dataclasses.asdict(self.totals),
            "peak": self.peak.state(),
            "unit_wh": {k: list(v) for k, v in self.unit_wh.items()},
        }

    def parse(
        self, data: Mapping[str, Any]
    ) -> tuple[SiteTotals, PeakTracker, dict[str, tuple[float, float]]]:
        """What :meth:`state` gave, checked; ValueError naming the field, nothing changed."""
        totals = obj(data, "totals")
        fields = {f.name for f in dataclasses.fields(SiteTotals)}
        if set(totals) - fields:
            raise ValueError(f"totals: keys must be from {sorted(fields)}")
        values = {k: number(totals, k) for k in totals}
        if any(v < 0 for k, v in values.items() if k not in ("cost", "savings")):
            raise ValueError("totals: energy and carbon totals must be >= 0")
        peak = PeakTracker(self._window_s, self._tz)
        peak.restore(obj(data, "peak"))
        # Absent from a state written before the per-unit counters existed: they start at 0.
        return SiteTotals(**values), peak, _unit_energy(data.get("unit_wh", {}))

    def billed_so_far(self, snapshot: Snapshot, grid: float | None) -> tuple[float, float]:
        """What the meter measured of the billing window under way: imported Wh and seconds.

        The decide phase runs before this cycle's :meth:`integrate`, so the interval since the
        last cycle (``grid`` over the monotonic time since then, to the snapshot's time) is
        counted here too.
        """
        last = self._last_mono
        pending = 0.0 if last is None else min(max(0.0, snapshot.mono - last), MAX_INTEGRATION_S)
        return self.peak.so_far(snapshot.time, grid if last is not None else None, pending)

    def integrate(
        self,
        now: float,
        mono: float,
        grid: float | None,
        snapshot: Snapshot,
        forecast: Forecast,
    ) -> None:
        """Add this cycle's energy, cost and carbon to the totals and the billing peak."""
        last = self._last_mono
        self._last_mono = mono
        if last is None or grid is None:
            return
        dt = min(max(0.0, mono - last), MAX_INTEGRATION_S)
        kwh_in = max(0.0, grid) * dt / 3.6e6
        kwh_out = max(0.0, -grid) * dt / 3.6e6
        co2 = kwh_in * float(forecast.carbon_g_per_kwh[0]) / 1000.0
        charged = discharged = battery_w = 0.0
        for r in snapshot.batteries.values():
            if r.power_w.valid and r.power_w.value is not None:
                battery_w += r.power_w.value
                wh = r.power_w.value * dt / 3600.0
                discharged += max(0.0, wh)
                charged += max(0.0, -wh)
                c, d = self.unit_wh.get(r.device_id, (0.0, 0.0))
                self.unit_wh[r.device_id] = (c + max(0.0, -wh), d + max(0.0, wh))
        tot = self.totals
        cost = (
            kwh_in * float(forecast.import_price[0])
            - kwh_out * float(forecast.export_price[0])
            + co2 * self._carbon_price
        )
        prices = {
            "import_price": float(forecast.import_price[0]),
            "export_price": float(forecast.export_price[0]),
            "carbon_g_per_kwh": float(forecast.carbon_g_per_kwh[0]),
            "carbon_price_per_kg": self._carbon_price,
        }
        # With every battery idle, the meter would have read grid + battery power.
        saved = step_cost(grid + battery_w, dt, **prices) - step_cost(grid, dt, **prices)
        pv = max(0.0, measured_pv(snapshot) or 0.0)
        self.totals = SiteTotals(
            imported_wh=tot.imported_wh + kwh_in * 1000.0,
            exported_wh=tot.exported_wh + kwh_out * 1000.0,
            cost=tot.cost + cost,
            co2_kg=tot.co2_kg + co2,
            battery_charged_wh=tot.battery_charged_wh + charged,
            battery_discharged_wh=tot.battery_discharged_wh + discharged,
            pv_wh=tot.pv_wh + pv * dt / 3600.0,
            savings=tot.savings + saved,
        )
        self.peak.add(now, grid, dt)


def _unit_energy(data: Any) -> dict[str, tuple[float, float]]:
    """The durable per-unit energy counters; ValueError naming the field when they do not fit."""
    if not isinstance(data, Mapping):
        raise ValueError("unit_wh: must be an object of device id -> [charged_wh, discharged_wh]")
    out = {}
    for k, v in data.items():
        ok = isinstance(v, list) and len(v) == 2
        ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        if not ok or not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError(f"unit_wh.{k}: must be [charged_wh, discharged_wh], both >= 0")
        out[str(k)] = (float(v[0]), float(v[1]))
    return out
