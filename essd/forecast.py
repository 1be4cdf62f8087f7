"""Forecasts over the horizon: net load, PV, import/export prices and grid carbon intensity.

Sources, in order of precedence for each quantity:
1. an external override (MQTT ``forecast``/``prices`` commands) while it covers the step;
2. an online series (day-ahead prices, a PV forecast: :class:`OnlineSeries`, fetched in the
   background by :mod:`essd.online`) while it covers the step and is not older than its
   ``expires_at``; online PV only where load is forecast apart from PV (PV measured, or load
   from a file), since a learned net load has the PV folded in already;
3. a site series file (CSV) when configured;
4. built-in forecasters, each a :class:`essd.forecasters.QuantityForecaster` that learns every
   observation while config chooses which one predicts: the tariff for prices, a constant
   carbon intensity, and for load either
   *persistence* (the last observation, held), a *daily profile* learned online from the meter
   (an exponentially weighted average per time-of-day bin, persistence until a bin has data) or
   a *week profile* (weekday and weekend/holiday profiles, robust, with the latest deviation
   decaying; :mod:`essd.forecasters`); for PV the same, or *clear-sky* PV (pvlib, the site's
   array) times a learned clearness.

An observation is the average since the previous one (a meter read every cycle): the week
profile and the clear-sky PV learn it at the middle of that interval, at most one step back.

The meter sees only net load (load - PV). Where the units measure their own PV (a
``pv_power_w`` field in their profile), load and PV are learned apart; elsewhere the learned
profile forecasts net load, which is negative whenever PV exceeds load, and ``pv_w`` is zero.
Learned state can be saved and restored (:meth:`Forecaster.state`, :meth:`Forecaster.restore`)
so a restart does not forget what was learned.

Units: W, prices per kWh in the tariff currency, carbon intensity in g/kWh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from essd.clock import local_midnight
from essd.config import ForecastConfig, TariffConfig
from essd.forecasters import ClearSkyPV, Persistence, QuantityForecaster, WeekProfile
from essd.series import SERIES_COLUMNS, read_series_csv

FloatArray = npt.NDArray[np.float64]


class ForecastError(ValueError):
    """A forecast source is unusable; the message names the file/field."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """Per-step forecasts over the horizon from ``start`` (epoch s), each ``step_s`` long."""

    start: float
    step_s: float
    load_w: FloatArray
    pv_w: FloatArray
    import_price: FloatArray
    export_price: FloatArray
    carbon_g_per_kwh: FloatArray
    # How far the load may come in above ``load_w`` (W, >= 0; a typical deviation): the
    # demand charge is planned against load + a multiple of it.
    load_spread_w: FloatArray | None = None

    @property
    def steps(self) -> int:
        """Number of steps."""
        return len(self.load_w)


@dataclass(frozen=True, slots=True)
class Override:
    """An external time series (from MQTT) that wins while it covers a step."""

    start: float
    step_s: float
    values: tuple[float, ...]

    def value_at(self, t: float) -> float | None:
        """The value covering epoch ``t``, or None outside the series."""
        if t < self.start:
            return None
        k = int((t - self.start) // self.step_s)
        return self.values[k] if k < len(self.values) else None

    def ended(self, t: float) -> bool:
        """True once ``t`` is past the end of the series."""
        return t >= self.start + self.step_s * len(self.values)


#: The quantities an online source may provide.
ONLINE_QUANTITIES = ("import_price", "export_price", "pv_w")


@dataclass(frozen=True, slots=True)
class OnlineSeries:
    """A fetched forecast: ``values[k]`` covers ``[start + k*step_s, start + (k+1)*step_s)``
    (epoch s); used while the forecast's start is before ``expires_at``."""

    source: str
    start: float
    step_s: float
    values: FloatArray
    fetched_at: float
    expires_at: float

    @property
    def end(self) -> float:
        """Epoch seconds where the series stops covering."""
        return self.start + self.step_s * len(self.values)

    def over(self, times: FloatArray, fallback: FloatArray) -> FloatArray:
        """``fallback`` with the series' value at each of ``times`` it covers."""
        k = np.floor((times - self.start) / self.step_s)
        covered = (k >= 0) & (k < len(self.values))
        idx = np.where(covered, k, 0).astype(np.int64)
        out: FloatArray = np.where(covered, self.values[idx], fallback)
        return out


def tariff_import_price(tariff: TariffConfig, local: datetime) -> float:
    """The import price per kWh at local time ``local``."""
    if tariff.import_price_per_kwh is not None:
        return tariff.import_price_per_kwh
    tod = local.time()
    table = tariff.import_tou
    if tariff.import_tou_weekend and (local.weekday() >= 5 or local.date() in tariff.holidays):
        table = tariff.import_tou_weekend
    price = table[0].price_per_kwh
    for window in table:
        if window.start <= tod:
            price = window.price_per_kwh
    return price


class SeriesFile:
    """A site time series CSV: a ``time`` column (ISO 8601 with offset, or epoch seconds) and
    any of ``load_w, pv_w, import_price, export_price, carbon_g_per_kwh``.

    A file spanning at most one day is a daily profile, looked up by time of day (in the site's
    time zone); a longer file is looked up by absolute time and holds its last value.
    """

    def __init__(self, path: Path, tz: ZoneInfo) -> None:
        self.path = path
        self._tz = tz
        self._t, self._cols = read_series_csv(path, tz, error=ForecastError)
        self.daily = float(self._t[-1] - self._t[0]) < 86_400.0

    def has(self, column: str) -> bool:
        """True when the file has ``column``."""
        return column in self._cols

    def sample(self, column: str, times: FloatArray) -> FloatArray:
        """Values of ``column`` at epoch ``times`` (previous sample; daily files by time of day)."""
        values = self._cols[column]
        if self.daily:
            offsets = (self._t - local_midnight(float(self._t[0]), self._tz)) % 86_400.0
            order = np.argsort(offsets)
            offs, vals = offsets[order], values[order]
            q = np.array(
                [_seconds_of_day(datetime.fromtimestamp(float(x), tz=self._tz)) for x in times]
            )
            idx = np.searchsorted(offs, q, side="right") - 1  # -1 wraps to the day's last sample
            return np.asarray(vals[idx], dtype=np.float64)
        idx = np.clip(np.searchsorted(self._t, times, side="right") - 1, 0, len(self._t) - 1)
        return np.asarray(values[idx], dtype=np.float64)


def _seconds_of_day(dt: datetime) -> float:
    return dt.hour * 3600.0 + dt.minute * 60.0 + dt.second + dt.microsecond / 1e6


class DailyProfile:
    """Net load learned online: an EWMA per time-of-day bin, persistence until a bin has data."""

    def __init__(self, tz: ZoneInfo, *, bin_s: float = 900.0, alpha: float = 0.3) -> None:
        if not 60 <= bin_s <= 3600 or 86_400 % bin_s:
            raise ValueError("bin_s: must divide a day, between 60 and 3600")
        self._tz = tz
        self._bin_s = bin_s
        self._alpha = alpha
        self._values = np.full(int(86_400 // bin_s), np.nan)
        self.latest = Persistence()  # the persistence forecast, and the fallback here

    @property
    def last(self) -> float | None:
        """The latest observation (the persistence forecast)."""
        return self.latest.last

    def _bin(self, t: float) -> int:
        return int(_seconds_of_day(datetime.fromtimestamp(t, tz=self._tz)) // self._bin_s)

    def observe(self, t: float, value: float) -> None:
        """Learn one observation (W) at epoch ``t`` (non-finite values are ignored)."""
        if not math.isfinite(value):
            return
        b = self._bin(t)
        old = self._values[b]
        self._values[b] = value if np.isnan(old) else old + self._alpha * (value - old)
        self.latest.observe(t, value)

    def predict(self, times: FloatArray) -> FloatArray:
        """Net load forecasts at ``times``; persistence (or 0) for bins without data."""
        fallback = 0.0 if self.latest.last is None else self.latest.last
        out = np.array([self._values[self._bin(float(t))] for t in times])
        return np.where(np.isnan(out), fallback, out)

    def state(self) -> dict[str, object]:
        """What was learned, as JSON-ready data (NaN bins as None)."""
        return {
            "bin_s": self._bin_s,
            "values": [None if math.isnan(v) else float(v) for v in self._values],
            "last": self.latest.last,
        }

    def restore(self, data: object) -> None:
        """Take back what :meth:`state` gave; ValueError naming the field if it does not fit."""
        if not isinstance(data, dict):
            raise ValueError("must be an object")
        if data.get("bin_s") != self._bin_s:
            raise ValueError(f"bin_s: expected {self._bin_s:g}")
        values = data.get("values")
        if not isinstance(values, list) or len(values) != len(self._values):
            raise ValueError(f"values: expected a list of {len(self._values)} numbers")
        arr = np.array([math.nan if v is None else float(v) for v in values])
        if np.isinf(arr).any():
            raise ValueError("values: must be finite numbers or null")
        last = data.get("last")
        if last is not None and not (isinstance(last, int | float) and math.isfinite(last)):
            raise ValueError("last: must be a finite number or null")
        self._values = arr
        self.latest.last = None if last is None else float(last)


class Forecaster:
    """Builds the per-cycle :class:`Forecast` from config, series file, learning and overrides."""

    def __init__(self, forecast: ForecastConfig, tariff: TariffConfig, timezone: str) -> None:
        self._cfg = forecast
        self._tariff = tariff
        self._tz = ZoneInfo(timezone)
        self._series = (
            SeriesFile(forecast.series_file, self._tz) if forecast.series_file is not None else None
        )
        # Every forecaster of a quantity learns every observation; config chooses which
        # predicts (_load_model, _pv_model). Load is net load, or load where PV is measured.
        self._profile = DailyProfile(self._tz)
        self._pv = DailyProfile(self._tz)
        self._week = WeekProfile(self._tz, holidays=tariff.holidays)
        self._clear = (
            ClearSkyPV(forecast.pv_array, self._tz) if forecast.pv_array is not None else None
        )
        self._last_t: float | None = None
        self.pv_measured = False
        self.overrides: dict[str, Override] = {}
        self.online: dict[str, OnlineSeries] = {}

    def observe(self, t: float, net_load_w: float, pv_w: float | None = None) -> None:
        """Feed one observation: meter-derived net load (grid + battery discharge, W) and,
        where the units measure it, PV power (W >= 0); load is then learned as net + PV."""
        last, self._last_t = self._last_t, t
        # The middle of the interval the observation averages (at most one step back).
        mid = t if last is None or not 0 < t - last <= 3600.0 else t - (t - last) / 2
        if pv_w is not None and math.isfinite(pv_w) and pv_w >= 0:
            self.pv_measured = True
            self._profile.observe(t, net_load_w + pv_w)
            self._week.observe(mid, net_load_w + pv_w)
            self._pv.observe(t, pv_w)
            if self._clear is not None:
                self._clear.observe(mid, pv_w)
        elif not self.pv_measured:
            self._profile.observe(t, net_load_w)
            self._week.observe(mid, net_load_w)

    def state(self) -> dict[str, object]:
        """Learned state for the durable state file."""
        return {
            "load": self._profile.state(),
            "pv": self._pv.state(),
            "week": self._week.state(),
            "clear_sky": None if self._clear is None else self._clear.state(),
            "pv_measured": self.pv_measured,
        }

    def restore(self, data: object) -> None:
        """Restore :meth:`state`; ValueError naming the field when it does not fit."""
        if not isinstance(data, dict):
            raise ValueError("forecaster: must be an object")
        fresh = {"load": DailyProfile(self._tz), "pv": DailyProfile(self._tz)}
        for name, profile in fresh.items():
            try:
                profile.restore(data.get(name))
            except ValueError as exc:
                raise ValueError(f"forecaster.{name}: {exc}") from None
        week = WeekProfile(self._tz, holidays=self._tariff.holidays)
        if data.get("week") is not None:  # absent in state saved before it existed
            try:
                week.restore(data["week"])
            except ValueError as exc:
                raise ValueError(f"forecaster.week: {exc}") from None
        clear = None
        if self._clear is not None and self._cfg.pv_array is not None:
            clear = ClearSkyPV(self._cfg.pv_array, self._tz)
            if data.get("clear_sky") is not None:
                try:
                    clear.restore(data["clear_sky"])
                except ValueError as exc:
                    raise ValueError(f"forecaster.clear_sky: {exc}") from None
        self._profile, self._pv = fresh["load"], fresh["pv"]
        self._week, self._clear = week, clear
        self.pv_measured = bool(data.get("pv_measured", False))

    def set_override(self, quantity: str, override: Override) -> None:
        """Install an external series for ``quantity`` (one of the Forecast fields)."""
        if quantity not in SERIES_COLUMNS:
            raise ValueError(f"quantity: unknown {quantity!r} (one of {', '.join(SERIES_COLUMNS)})")
        self.overrides[quantity] = override

    def set_online(self, quantity: str, series: OnlineSeries | None) -> None:
        """Install (or with None, drop) an online series for ``quantity``."""
        if quantity not in ONLINE_QUANTITIES:
            raise ValueError(f"quantity: {quantity!r} has no online source")
        if series is None:
            self.online.pop(quantity, None)
        else:
            self.online[quantity] = series

    def _online(self, name: str, start: float, times: FloatArray, arr: FloatArray) -> FloatArray:
        series = self.online.get(name)
        if series is None or start >= series.expires_at or series.end <= start:
            return arr
        if name == "pv_w" and not (self.pv_measured or self._cfg.load == "file"):
            return arr  # the learned net load already has the PV in it
        return series.over(times, arr)

    def _load_model(self, kind: str) -> QuantityForecaster:
        """The load forecaster ``forecast.load`` names (the daily profile for the rest)."""
        models: dict[str, QuantityForecaster] = {
            "week-profile": self._week,
            "persistence": self._profile.latest,
        }
        return models.get(kind, self._profile)

    def _pv_model(self, kind: str) -> QuantityForecaster:
        """The PV forecaster ``forecast.pv`` names (the daily profile for the rest)."""
        models: dict[str, QuantityForecaster] = {"persistence": self._pv.latest}
        if self._clear is not None:
            models["clear-sky"] = self._clear
        return models.get(kind, self._pv)

    def _learned(self, kind: str, times: FloatArray) -> FloatArray:
        return self._load_model(kind).predict(times)

    def _learned_pv(self, kind: str, times: FloatArray) -> FloatArray:
        return np.maximum(self._pv_model(kind).predict(times), 0.0)

    def _from_file(self, column: str, times: FloatArray) -> FloatArray | None:
        if self._series is None or not self._series.has(column):
            return None
        return self._series.sample(column, times)

    def forecast(self, start: float, step_s: float, steps: int) -> Forecast:
        """Forecasts for ``steps`` steps from epoch ``start``."""
        times = start + step_s * np.arange(steps, dtype=np.float64)
        load = self._from_file("load_w", times) if self._cfg.load == "file" else None
        pv = self._from_file("pv_w", times) if self._cfg.pv == "file" else None
        imp = self._from_file("import_price", times)
        exp = self._from_file("export_price", times)
        carbon = self._from_file("carbon_g_per_kwh", times)
        learned_pv = self.pv_measured and self._cfg.pv in (
            "daily-profile",
            "clear-sky",
            "persistence",
        )
        if pv is None and learned_pv:
            pv = self._learned_pv(self._cfg.pv, times)
        arrays = {
            "load_w": self._learned(self._cfg.load, times) if load is None else load,
            # Learned net load already has PV folded in: PV is zero unless measured or a file.
            "pv_w": np.zeros(steps) if pv is None else pv,
            "import_price": (
                np.array([self._tariff_price(float(t)) for t in times]) if imp is None else imp
            ),
            "export_price": np.full(steps, self._tariff.export_price_per_kwh)
            if exp is None
            else exp,
            "carbon_g_per_kwh": np.full(steps, self._cfg.carbon_intensity_g_per_kwh)
            if carbon is None
            else carbon,
        }
        for name in list(self.online):  # set by the fetch task between cycles
            arrays[name] = self._online(name, start, times, arrays[name])
        for name, ov in list(self.overrides.items()):
            if ov.ended(start):
                del self.overrides[name]
                continue
            arr = arrays[name].copy()
            for k, t in enumerate(times):
                v = ov.value_at(float(t))
                if v is not None:
                    arr[k] = v
            arrays[name] = arr
        spread = None
        if self._cfg.load == "week-profile" and "load_w" not in self.overrides and load is None:
            spread = self._week.spread(times)
        return Forecast(start=start, step_s=step_s, **arrays, load_spread_w=spread)

    def _tariff_price(self, t: float) -> float:
        return tariff_import_price(self._tariff, datetime.fromtimestamp(t, tz=self._tz))


def billing_period_start(t: float, tz: ZoneInfo) -> float:
    """Epoch seconds of the start of the (monthly) billing period containing ``t``."""
    d = datetime.fromtimestamp(t, tz=tz)
    return datetime(d.year, d.month, 1, tzinfo=tz).timestamp()
