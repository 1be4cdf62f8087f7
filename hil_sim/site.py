"""A simulated site: load and PV series, its storage units and the grid meter.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
Grid power at the connection point = load - PV used - sum(battery power).

Series files (``profiles/sites/*.csv``) have the format essd's forecaster reads, parsed by
:func:`essd.series.read_series_csv`: a ``time`` column (ISO 8601 with offset, or epoch seconds)
and any of ``load_w, pv_w, import_price, export_price, carbon_g_per_kwh``. A file spanning less
than a day is a daily profile, repeated every day in the site's time zone; a longer one is read
by absolute time and holds its end values. The simulator interpolates linearly between samples
(a real load does not jump every five minutes).

``profiles/sites/example.csv`` is a winter day at the example site: a Chongqing industrial park
(two shifts, 24 kW night base to 80 kW), two households and a campsite; 90 kWp of PV on a hazy
day (38 kW peak); the time-of-use tariff of ``example.toml``; zero export; the central China
grid's carbon intensity (525-635 g/kWh, lower at midday hydro and solar).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from drivers.profile_loader import shipped_profiles_dir
from essd.clock import Clock, local_midnight
from essd.config import Settings
from essd.series import SeriesError, read_series_csv
from hil_sim.battery import Alarm
from hil_sim.devices import MeterDevice, PortableDevice, StorageDevice
from hil_sim.truth import BatteryTruth, Limits, SiteTruth, Violation, violations_in

_DAY = 86_400.0


def default_series_path(settings: Settings, site_file: Path | None) -> Path:
    """The series a site runs on: the forecast's series file, a CSV beside the site file
    (same stem), else the example site's shipped one."""
    if settings.forecast.series_file is not None:
        return settings.forecast.series_file
    if site_file is not None and site_file.with_suffix(".csv").is_file():
        return site_file.with_suffix(".csv")
    return shipped_profiles_dir() / "sites" / "example.csv"


class SiteSeries:
    """Site time series with linear interpolation (daily profiles wrap around midnight), or
    held from one sample to the next (``hold``: the values are step averages)."""

    def __init__(
        self,
        times: npt.ArrayLike,
        columns: dict[str, npt.ArrayLike],
        *,
        tz: ZoneInfo,
        source: str = "series",
        hold: bool = False,
    ) -> None:
        t = np.asarray(times, dtype=np.float64)
        self.hold = hold
        if t.size == 0:
            raise SeriesError(f"{source}: no data rows")
        if np.any(np.diff(t) <= 0):
            raise SeriesError(f"{source}: time: must be strictly increasing")
        self.source = source
        self._tz = tz
        self.daily = float(t[-1] - t[0]) < _DAY
        self._cols = {c: np.asarray(v, dtype=np.float64) for c, v in columns.items()}
        if self.daily:
            # Offsets into the local day, sorted, with one wrapped sample on each side so that
            # interpolation runs across midnight.
            midnight = local_midnight(float(t[0]), self._tz)
            offs = (t - midnight) % _DAY
            order = np.argsort(offs)
            offs = offs[order]
            self._x = np.concatenate(([offs[-1] - _DAY], offs, [offs[0] + _DAY]))
            self._y = {
                c: np.concatenate(([v[order][-1]], v[order], [v[order][0]]))
                for c, v in self._cols.items()
            }
        else:
            self._x = t
            self._y = self._cols

    @classmethod
    def load(cls, path: Path, tz: ZoneInfo) -> SiteSeries:
        """Read a series CSV (SeriesError naming the file, line and column on bad input)."""
        times, cols = read_series_csv(
            path, tz, error=SeriesError, non_negative=("load_w", "pv_w", "carbon_g_per_kwh")
        )
        return cls(times, dict(cols), tz=tz, source=str(path))

    @classmethod
    def constant(cls, tz: ZoneInfo, **values: float) -> SiteSeries:
        """A flat series (tests): every column constant."""
        return cls([0.0], {k: [v] for k, v in values.items()}, tz=tz, source="constant")

    def has(self, column: str) -> bool:
        """True when the series has ``column``."""
        return column in self._y

    def value(self, column: str, t: float, default: float = 0.0) -> float:
        """``column`` at epoch ``t`` (``default`` when the series has no such column)."""
        y = self._y.get(column)
        if y is None:
            return default
        x = (t - local_midnight(t, self._tz)) % _DAY if self.daily else t
        if self.hold:
            # Step averages: the sample that starts the step holds until the next one.
            k = int(np.searchsorted(self._x, x, side="right")) - 1
            return float(y[min(max(k, 0), len(y) - 1)])
        return float(np.interp(x, self._x, y))

    def values(self, column: str, times: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``column`` at each epoch of ``times`` (for the scenario runner)."""
        return np.array([self.value(column, float(t)) for t in np.asarray(times)])


class Site:
    """Load, PV, storage units and a meter; the true state on demand."""

    def __init__(
        self,
        *,
        clock: Clock,
        series: SiteSeries,
        export_limiter: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.clock = clock
        self.series = series
        self.export_limiter = export_limiter
        self.limits = limits or Limits()
        self.storage: dict[str, StorageDevice] = {}
        self.meters: dict[str, MeterDevice] = {}
        self._violations: list[Violation] = []
        self._active: set[tuple[str, str]] = set()  # (kind, device) of violations under way

    def add_storage(self, device: StorageDevice) -> None:
        """Put a storage unit on the site."""
        self.storage[device.device_id] = device

    def add_meter(self, meter: MeterDevice) -> None:
        """Put a meter on the site."""
        self.meters[meter.device_id] = meter

    def battery_power_w(self) -> float:
        """Sum of the units' power exchanged with the site (> 0 discharging)."""
        total = 0.0
        for dev in self.storage.values():
            if isinstance(dev, PortableDevice):
                total += dev.site_power_w()
            else:
                total += dev.true_state().power_w
        return total

    def _flows(self, t: float) -> tuple[float, float, float, float]:
        load = self.series.value("load_w", t)
        pv_avail = self.series.value("pv_w", t)
        batteries = self.battery_power_w()
        pv = pv_avail
        if self.export_limiter and math.isfinite(self.limits.export_w):
            # Anti-backflow: the PV inverters curtail so that export stays within the limit.
            pv = min(pv_avail, max(0.0, load - batteries + self.limits.export_w))
        grid = load - pv - batteries
        return load, pv, pv_avail, grid

    def grid_power_w(self) -> float:
        """Grid power at the connection point now (> 0 imports): what the meter measures."""
        return self._flows(self.clock.now())[3]

    def truth(self) -> SiteTruth:
        """Advance everything to the clock's now and return the true state."""
        t = self.clock.now()
        load, pv, pv_avail, grid = self._flows(t)
        units: dict[str, BatteryTruth] = {}
        for dev_id, dev in self.storage.items():
            s = dev.battery.state()
            unplugged = dev.faults.unplugged
            units[dev_id] = BatteryTruth(
                device_id=dev_id,
                soc=s.soc,
                energy_wh=s.energy_wh,
                capacity_wh=dev.battery.params.capacity_wh,
                power_w=0.0 if unplugged else s.power_w,
                commanded_w=s.commanded_w,
                max_charge_w=s.limits.max_charge_w,
                max_discharge_w=s.limits.max_discharge_w,
                temperature_c=s.temperature_c,
                available=not (unplugged or dev.faults.no_answer),
                alarm=Alarm.OVER_TEMPERATURE in s.alarms,
                reverts=dev.reverts,
            )
        truth = SiteTruth(t, load, pv, pv_avail, grid, units)
        # essd steers a portable unit through limits, not commands: its power is not judged.
        portable = {d for d, dev in self.storage.items() if isinstance(dev, PortableDevice)}
        limits = replace(self.limits, commanded=frozenset(units) - portable)
        now = violations_in(truth, limits)
        # Each violation is recorded once, when it starts.
        self._violations += [v for v in now if (v.kind, v.device) not in self._active]
        self._active = {(v.kind, v.device) for v in now}
        return replace(truth, violations=tuple(self._violations))

    @property
    def violations(self) -> tuple[Violation, ...]:
        """Every violation seen so far (checked whenever :meth:`truth` runs)."""
        return tuple(self._violations)
