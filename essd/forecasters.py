"""Forecasters of one quantity each, behind one protocol, learning online and persisted.

- :class:`WeekProfile`: a time-of-day profile per day type (weekday; weekend and holidays),
  learned as a robust running mean per bin (an innovation larger than three running mean
  absolute deviations is clipped, so one kettle or one outage does not bend the profile), plus
  the latest deviation from the profile carried forward and decaying at the learned lag-one
  autocorrelation of the deviations (what happens now says most about the next steps).
- :class:`ClearSkyPV`: clear-sky AC power from the site's geometry (pvlib's Ineichen model,
  transposed to the module plane, times kWp and losses) times a clearness learned from
  measured PV: the latest clearness decays towards the seasonal mean (a slow running mean of
  the clearness) over the horizon, at a learned rate.

Both forecast the rest of a step the meter has already seen part of (cycles shorter than a
step) as what it saw of it: a step's own value outweighs any forecast of it.

``observe(t, value)`` learns one step-average observation at epoch ``t``; ``predict(times)``
forecasts at epoch ``times``; ``state()`` / ``restore(data)`` persist what was learned
(ValueError naming the field when data does not fit). Units: W.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection
from datetime import date, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from essd.config import PvArrayConfig

FloatArray = npt.NDArray[np.float64]


class QuantityForecaster(Protocol):
    """One quantity's forecaster (load or PV, W)."""

    def observe(self, t: float, value: float) -> None:
        """Learn one observation at epoch ``t`` (non-finite values are ignored)."""

    def predict(self, times: FloatArray) -> FloatArray:
        """Forecasts at epoch ``times``."""

    def state(self) -> dict[str, Any]:
        """What was learned, JSON-ready."""

    def restore(self, data: object) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""


def _floats(data: dict[str, Any], key: str, shape: tuple[int, ...]) -> FloatArray:
    raw = data.get(key)
    try:
        arr = np.array(
            [[math.nan if v is None else float(v) for v in row] for row in raw]  # type: ignore[union-attr]
            if len(shape) == 2
            else [math.nan if v is None else float(v) for v in raw],  # type: ignore[union-attr]
            dtype=np.float64,
        )
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected numbers or null") from None
    if arr.shape != shape or np.isinf(arr).any():
        raise ValueError(f"{key}: expected {shape} finite numbers or null")
    return arr


def _number(data: dict[str, Any], key: str, *, optional: bool = False) -> float | None:
    v = data.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key}: expected a finite number")
    return float(v)


def _jsonable(arr: FloatArray) -> list[Any]:
    return [None if math.isnan(v) else float(v) for v in arr.ravel()]


class _Residual:
    """The latest deviation from a base forecast and its learned lag-one (one step)
    autocorrelation; observations may come more often than once a step (short cycles): the
    autocorrelation is learned from pairs about one step apart."""

    def __init__(self, step_s: float, alpha: float = 0.02) -> None:
        self.step_s = step_s
        self.alpha = alpha
        self.c0 = 0.0
        self.c1 = 0.0
        self.last: float | None = None
        self.last_t: float | None = None
        self._ref: tuple[float, float] | None = None  # (t, deviation) about a step back

    def add(self, t: float, resid: float) -> None:
        a = self.alpha
        self.last, self.last_t = resid, t
        if self._ref is None:
            self._ref = (t, resid)
            self.c0 += a * (resid * resid - self.c0)
            return
        gap = t - self._ref[0]
        if gap < 0.5 * self.step_s:
            return  # within the step of the reference: wait for the next step
        if gap <= 1.5 * self.step_s:
            self.c1 += a * (resid * self._ref[1] - self.c1)
        self.c0 += a * (resid * resid - self.c0)
        self._ref = (t, resid)

    @property
    def phi(self) -> float:
        return 0.0 if self.c0 <= 0 else min(max(self.c1 / self.c0, 0.0), 0.95)

    def carry(self, times: FloatArray) -> FloatArray:
        """The last deviation carried to ``times``, decaying per step ahead."""
        if self.last is None or self.last_t is None:
            return np.zeros(len(times))
        ahead = np.maximum((times - self.last_t) / self.step_s, 0.0)
        out: FloatArray = self.last * self.phi**ahead
        return out

    def state(self) -> dict[str, Any]:
        return {"c0": self.c0, "c1": self.c1, "last": self.last, "last_t": self.last_t}

    def restore(self, data: dict[str, Any]) -> None:
        c0 = _number(data, "c0")
        c1 = _number(data, "c1")
        last = _number(data, "last", optional=True)
        last_t = _number(data, "last_t", optional=True)
        assert c0 is not None
        assert c1 is not None
        if c0 < 0:
            raise ValueError("c0: must be >= 0")
        self.c0, self.c1, self.last, self.last_t = c0, c1, last, last_t
        self._ref = None if last is None or last_t is None else (last_t, last)


class _Current:
    """The latest observation of the current step (clock-aligned: epoch // ``step_s``).

    With cycles shorter than a step the meter has seen part of the step being planned; what
    it saw last is the forecast for the rest of that step, taken as observed (not damped
    towards the profile, not clipped as a burst): the step's own value outweighs any
    forecast of it. A new step starts blind (its forecast is the profile and the carry).
    """

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._index: int | None = None
        self._value = 0.0

    def add(self, t: float, value: float) -> None:
        """One observation (the average since the previous one) at its middle ``t``."""
        self._index, self._value = int(t // self.step_s), value

    def over(self, times: FloatArray, forecast: FloatArray) -> FloatArray:
        """``forecast`` with the observed value at the ``times`` in the observed step."""
        if self._index is None:
            return forecast
        same = np.floor(times / self.step_s) == self._index
        out: FloatArray = np.where(same, self._value, forecast)
        return out


class Persistence:
    """The latest observation, held over the horizon (0 before the first)."""

    def __init__(self) -> None:
        self.last: float | None = None

    def observe(self, t: float, value: float) -> None:
        """Keep ``value`` as the forecast (non-finite values are ignored)."""
        del t
        if math.isfinite(value):
            self.last = float(value)

    def predict(self, times: FloatArray) -> FloatArray:
        """The latest observation at every one of ``times``."""
        return np.full(len(times), 0.0 if self.last is None else self.last)

    def state(self) -> dict[str, Any]:
        """The latest observation, JSON-ready."""
        return {"last": self.last}

    def restore(self, data: object) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""
        if not isinstance(data, dict):
            raise ValueError("must be an object")
        last = _number(data, "last", optional=True)
        self.last = last


class WeekProfile:
    """Load by day type (0 weekday, 1 weekend or holiday) and time of day; see the module."""

    def __init__(
        self,
        tz: ZoneInfo,
        *,
        bin_s: float = 900.0,
        alpha: float = 0.25,
        holidays: Collection[date] = (),
    ) -> None:
        if not 60 <= bin_s <= 3600 or 86_400 % bin_s:
            raise ValueError("bin_s: must divide a day, between 60 and 3600")
        self._tz = tz
        self._bin_s = bin_s
        self._alpha = alpha
        self._holidays = frozenset(holidays)
        n = int(86_400 // bin_s)
        self._mean = np.full((2, n), math.nan)
        self._mad = np.full((2, n), math.nan)
        self._resid = _Residual(bin_s)
        self._current = _Current(bin_s)
        self._last_obs: float | None = None

    def _weight(self, t: float) -> float:
        """The share of a step since the last observation (1 for the first or after a gap)."""
        last, self._last_obs = self._last_obs, t
        if last is None or not 0.0 < t - last < self._bin_s:
            return 1.0
        return (t - last) / self._bin_s

    def _key(self, t: float) -> tuple[int, int]:
        d = datetime.fromtimestamp(t, tz=self._tz)
        kind = 1 if d.weekday() >= 5 or d.date() in self._holidays else 0
        return kind, int((d.hour * 3600 + d.minute * 60 + d.second) // self._bin_s)

    def _base(self, kind: int, b: int) -> float:
        m = self._mean[kind, b]
        if math.isnan(m):
            m = self._mean[1 - kind, b]
        if math.isnan(m):
            known = self._mean[~np.isnan(self._mean)]
            m = float(known.mean()) if known.size else math.nan
        return float(m)

    def observe(self, t: float, value: float) -> None:
        """Learn one step-average observation at epoch ``t``."""
        if not math.isfinite(value):
            return
        self._current.add(t, value)
        kind, b = self._key(t)
        base = self._base(kind, b)
        m, mad = self._mean[kind, b], self._mad[kind, b]
        if math.isnan(m):
            self._last_obs = t
        if not math.isnan(base):
            # A burst (a kettle, an oven) is over before the next step: carry forward only
            # the part of the deviation within twice the usual one.
            usual = 2.0 * (mad if not math.isnan(mad) else abs(base) * 0.3)
            self._resid.add(t, min(max(value - base, -usual), usual))
        if math.isnan(m):
            self._mean[kind, b] = value
            self._mad[kind, b] = abs(value - base) if not math.isnan(base) else abs(value) * 0.3
            return
        r = value - m
        # The band never collapses to nothing on a perfectly regular load.
        band = 6.0 * max(mad, 0.05 * abs(m), 10.0)
        r = min(max(r, -band), band)
        # Observed several times a step (short cycles), each observation weighs its share.
        a = 1.0 - (1.0 - self._alpha) ** self._weight(t)
        self._mean[kind, b] = m + a * r
        self._mad[kind, b] = mad + a * (abs(r) - mad)

    def spread(self, times: FloatArray) -> FloatArray:
        """The running mean absolute deviation of the load in each step's bin (W; 0 unknown)."""
        out = np.array([self._mad[self._key(float(t))] for t in times])
        return np.where(np.isnan(out), 0.0, out)

    def predict(self, times: FloatArray) -> FloatArray:
        """The profile at ``times`` plus the latest deviation carried forward (0 W unknown)."""
        base = np.array([self._base(*self._key(float(t))) for t in times])
        base = np.where(np.isnan(base), self._resid.last or 0.0, base)
        return self._current.over(times, base + self._resid.carry(times))

    def state(self) -> dict[str, Any]:
        """What was learned, JSON-ready."""
        return {
            "bin_s": self._bin_s,
            "mean": _jsonable(self._mean),
            "mad": _jsonable(self._mad),
            "residual": self._resid.state(),
        }

    def restore(self, data: object) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""
        if not isinstance(data, dict):
            raise ValueError("must be an object")
        if data.get("bin_s") != self._bin_s:
            raise ValueError(f"bin_s: expected {self._bin_s:g}")
        n = self._mean.shape[1]
        mean = _floats(data, "mean", (2 * n,)).reshape(2, n)
        mad = _floats(data, "mad", (2 * n,)).reshape(2, n)
        resid = data.get("residual")
        if not isinstance(resid, dict):
            raise ValueError("residual: must be an object")
        fresh = _Residual(self._bin_s)
        try:
            fresh.restore(resid)
        except ValueError as exc:
            raise ValueError(f"residual.{exc}") from None
        self._mean, self._mad, self._resid = mean, mad, fresh


class ClearSkyPV:
    """PV = clear-sky power x clearness; see the module docstring."""

    def __init__(
        self,
        geometry: PvArrayConfig,
        tz: ZoneInfo,
        *,
        step_s: float = 900.0,
        prior_clearness: float = 0.6,
    ) -> None:
        self._geo = geometry
        self._tz = tz
        self._step_s = step_s
        self._days: dict[date, FloatArray] = {}
        self.seasonal = prior_clearness
        self._recent: float | None = None
        self._recent_t: float | None = None
        self._resid = _Residual(step_s)
        self._current = _Current(step_s)  # clearness observed in the current step

    def clear_sky_w(self, times: FloatArray) -> FloatArray:
        """Clear-sky AC power (W) of the site's array, averaged over the step at each time."""
        out = np.empty(len(times))
        per_day = round(86_400 / self._step_s)
        for k, t in enumerate(times):
            d = datetime.fromtimestamp(float(t), tz=self._tz)
            table = self._days.get(d.date())
            if table is None:
                table = self._day(d)
            i = int((d.hour * 3600 + d.minute * 60 + d.second) // self._step_s)
            out[k] = table[min(i, per_day - 1)]
        return out

    def _day(self, d: datetime) -> FloatArray:
        import pandas as pd  # noqa: PLC0415 - pvlib's types; loaded with pvlib
        import pvlib  # noqa: PLC0415 - heavy; only for sites that use clear-sky PV

        g = self._geo
        midnight = d.replace(hour=0, minute=0, second=0, microsecond=0)
        n = round(86_400 / self._step_s)
        # Mid-step times (a value is the step's average), in UTC to step over DST cleanly.
        start = pd.Timestamp(midnight).tz_convert("UTC") + pd.Timedelta(seconds=self._step_s / 2)
        index = pd.date_range(start, periods=n, freq=pd.Timedelta(seconds=self._step_s))
        loc = pvlib.location.Location(g.latitude, g.longitude)
        with warnings.catch_warnings():  # pvlib 0.16 uses pandas API that pandas 3 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            sun = loc.get_solarposition(index)
            cs = loc.get_clearsky(index, model="ineichen", solar_position=sun)
        poa = pvlib.irradiance.get_total_irradiance(
            g.tilt_deg,
            g.azimuth_deg,
            sun["apparent_zenith"],
            sun["azimuth"],
            cs["dni"],
            cs["ghi"],
            cs["dhi"],
        )["poa_global"]
        table: FloatArray = np.maximum(np.nan_to_num(poa.to_numpy(dtype=np.float64)), 0.0)
        table = table * g.kwp * g.losses
        if len(self._days) > 8:
            self._days.pop(next(iter(self._days)))
        self._days[d.date()] = table
        return table

    def observe(self, t: float, value: float) -> None:
        """Learn the clearness of one measured PV step average (W) at epoch ``t``."""
        if not math.isfinite(value) or value < 0:
            return
        cs = float(self.clear_sky_w(np.array([t]))[0])
        if cs < 0.1 * self._geo.kwp * 1000.0 * self._geo.losses:
            return  # low sun: the ratio says little
        k = min(value / cs, 1.3)
        self._resid.add(t, k - self.seasonal)
        self._current.add(t, k)
        self.seasonal += 0.01 * (k - self.seasonal)
        self._recent, self._recent_t = k, t

    def predict(self, times: FloatArray) -> FloatArray:
        """Clear-sky power times the clearness decaying from the latest towards the mean."""
        k = np.full(len(times), self.seasonal) + self._resid.carry(times)
        if self._recent_t is not None:
            # Overnight the latest clearness says nothing: from the next morning the mean.
            k = np.where(times - self._recent_t > 6 * 3600.0, self.seasonal, k)
        k = self._current.over(times, k)
        out: FloatArray = self.clear_sky_w(times) * np.clip(k, 0.0, 1.3)
        return out

    def state(self) -> dict[str, Any]:
        """What was learned, JSON-ready."""
        return {
            "seasonal": self.seasonal,
            "recent": self._recent,
            "recent_t": self._recent_t,
            "residual": self._resid.state(),
        }

    def restore(self, data: object) -> None:
        """Take back :meth:`state`; ValueError naming the field when it does not fit."""
        if not isinstance(data, dict):
            raise ValueError("must be an object")
        seasonal = _number(data, "seasonal")
        assert seasonal is not None
        if not 0.0 <= seasonal <= 1.3:
            raise ValueError("seasonal: must be a clearness in [0, 1.3]")
        resid = data.get("residual")
        if not isinstance(resid, dict):
            raise ValueError("residual: must be an object")
        fresh = _Residual(self._step_s)
        try:
            fresh.restore(resid)
        except ValueError as exc:
            raise ValueError(f"residual.{exc}") from None
        self.seasonal = seasonal
        self._recent = _number(data, "recent", optional=True)
        self._recent_t = _number(data, "recent_t", optional=True)
        self._resid = fresh
