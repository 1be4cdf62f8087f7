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

from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from drivers.profile_loader import shipped_profiles_dir
from essd.clock import Clock, local_midnight
from essd.config import Settings
from essd.series import SERIES_COLUMNS, SeriesError, read_series_csv
from hil_sim.battery import Alarm
from hil_sim.devices import MeterDevice, PortableDevice, StorageDevice

__all__ = [
    "SERIES_COLUMNS",
    "BatteryTruth",
    "SeriesError",
    "Site",
    "SiteSeries",
    "SiteTruth",
    "Violation",
    "default_series_path",
]

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
    """Site time series with linear interpolation (daily profiles wrap around midnight)."""

    def __init__(
        self,
        times: npt.ArrayLike,
        columns: dict[str, npt.ArrayLike],
        *,
        tz: ZoneInfo,
        source: str = "series",
    ) -> None:
        t = np.asarray(times, dtype=np.float64)
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
        return float(np.interp(x, self._x, y))

    def values(self, column: str, times: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``column`` at each epoch of ``times`` (for the scenario runner)."""
        return np.array([self.value(column, float(t)) for t in np.asarray(times)])


@dataclass(frozen=True, slots=True)
class BatteryTruth:
    """One unit as it really is. ``power_w`` > 0 discharges into the site; limits in W >= 0."""

    device_id: str
    soc: float
    energy_wh: float
    capacity_wh: float
    power_w: float
    commanded_w: float
    max_charge_w: float
    max_discharge_w: float
    temperature_c: float
    available: bool
    alarm: bool
    reverts: int


@dataclass(frozen=True, slots=True)
class Violation:
    """A limit the site or a device went beyond (counted once when it starts).

    ``kind``: ``command_beyond_limits`` (essd asked for more than the live limits),
    ``import_limit`` / ``export_limit`` (site grid limits, W), ``soc_below_reserve`` /
    ``soc_above_max`` (essd's configured SoC window while it was commanding power that way).
    """

    time: float
    kind: str
    device_id: str
    value: float
    limit: float


@dataclass(frozen=True, slots=True)
class SiteTruth:
    """The whole site at ``time``: series values, grid power (> 0 imports), every unit.

    ``pv_w`` is the PV actually produced (after export-limiter curtailment), ``pv_available_w``
    what the panels could produce.
    """

    time: float
    load_w: float
    pv_w: float
    pv_available_w: float
    grid_w: float
    batteries: dict[str, BatteryTruth]
    violations: tuple[Violation, ...] = ()


@dataclass
class SiteLimits:
    """Limits the site checks for violations (from the essd config); None = not checked."""

    import_w: float | None = None
    export_w: float | None = None
    reserve_soc: dict[str, float] = field(default_factory=dict)
    max_soc: dict[str, float] = field(default_factory=dict)


class Site:
    """Load, PV, storage units and a meter; the true state on demand."""

    def __init__(
        self,
        *,
        clock: Clock,
        series: SiteSeries,
        export_limiter: bool = False,
        limits: SiteLimits | None = None,
    ) -> None:
        self.clock = clock
        self.series = series
        self.export_limiter = export_limiter
        self.limits = limits or SiteLimits()
        self.storage: dict[str, StorageDevice] = {}
        self.meters: dict[str, MeterDevice] = {}
        self._violations: list[Violation] = []
        self._active: set[tuple[str, str]] = set()

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
        if self.export_limiter and self.limits.export_w is not None:
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
        self._check(t, grid, units)
        return SiteTruth(t, load, pv, pv_avail, grid, units, tuple(self._violations))

    def _flag(
        self, t: float, kind: str, device: str, value: float, limit: float, *, on: bool
    ) -> None:
        key = (kind, device)
        if on and key not in self._active:
            self._active.add(key)
            self._violations.append(Violation(t, kind, device, value, limit))
        elif not on:
            self._active.discard(key)

    def _check(self, t: float, grid: float, units: dict[str, BatteryTruth]) -> None:
        lim = self.limits
        if lim.import_w is not None:
            self._flag(t, "import_limit", "", grid, lim.import_w, on=grid > lim.import_w + 1.0)
        if lim.export_w is not None:
            self._flag(t, "export_limit", "", -grid, lim.export_w, on=-grid > lim.export_w + 1.0)
        for dev_id, u in units.items():
            if isinstance(self.storage[dev_id], PortableDevice):
                continue  # no setpoint: essd steers it through limits, not commands
            c = u.commanded_w
            excess = max(-c - u.max_charge_w, c - u.max_discharge_w)
            self._flag(t, "command_beyond_limits", dev_id, c, c - excess, on=excess > 1.0)
            reserve = lim.reserve_soc.get(dev_id)
            if reserve is not None:
                low = u.soc < reserve - 1e-3 and u.power_w > 0
                self._flag(t, "soc_below_reserve", dev_id, u.soc, reserve, on=low)
            top = lim.max_soc.get(dev_id)
            if top is not None:
                high = u.soc > top + 1e-3 and u.power_w < 0
                self._flag(t, "soc_above_max", dev_id, u.soc, top, on=high)

    @property
    def violations(self) -> tuple[Violation, ...]:
        """Every violation seen so far (checked whenever :meth:`truth` runs)."""
        return tuple(self._violations)
