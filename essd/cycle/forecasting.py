"""The cycle's forecast phase: the horizon's forecast, never raising, never non-finite.

A failed forecaster gives a persistence forecast of the measured net load (tariff prices);
non-finite values (and negative PV or carbon) are replaced step by step by that safe
forecast. Either way the cause is returned so the cycle plans on a lower rung.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np

from essd.config import Settings
from essd.domain import PlanCause, Snapshot
from essd.forecast import Forecast, Forecaster, tariff_import_price

_NON_NEGATIVE = ("pv_w", "carbon_g_per_kwh")


class CycleForecast:
    """Feeds the forecaster what the site measured and asks it for the horizon."""

    def __init__(
        self,
        settings: Settings,
        forecaster: Forecaster,
        on_failure: Callable[[str, BaseException], str],
        flexible_w: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        # What EV chargers draw (W): planned as sessions, so kept out of the learned load.
        self._flexible_w = flexible_w
        self._forecaster = forecaster
        self._on_failure = on_failure
        self._tz = ZoneInfo(settings.site.timezone)

    def __call__(
        self, now: float, snapshot: Snapshot, grid: float | None
    ) -> tuple[Forecast, PlanCause | None, str]:
        """The forecast, its cause when it is not the forecaster's own, and the detail."""
        ctl = self._settings.control
        net = None
        if grid is not None:
            net = grid + sum(
                r.power_w.value or 0.0 for r in snapshot.batteries.values() if r.power_w.valid
            )
            if self._flexible_w is not None:
                net -= self._flexible_w()
        try:
            if net is not None:
                self._forecaster.observe(now, net, measured_pv(snapshot))
            forecast = self._forecaster.forecast(now, ctl.step_s, ctl.horizon_steps)
        except Exception as exc:
            detail = self._on_failure("forecast", exc)
            return self.persistence(now, net), PlanCause.FORECAST_FAILED, detail
        # The safe stand-in (a tariff lookup per step) is built only when a value needs it.
        clean, bad = sanitize(forecast, lambda: self.persistence(now, net))
        if bad:
            detail = f"non-finite or negative forecast values in {', '.join(bad)}"
            self._on_failure("forecast", ValueError(detail))
            return clean, PlanCause.FORECAST_INVALID, detail
        return forecast, None, ""

    def persistence(self, now: float, net: float | None) -> Forecast:
        """A forecast that needs nothing but the present: net load held, tariff prices."""
        ctl = self._settings.control
        tariff = self._settings.tariff
        n = ctl.horizon_steps
        times = now + ctl.step_s * np.arange(n, dtype=np.float64)
        try:
            imp = np.array(
                [
                    tariff_import_price(tariff, datetime.fromtimestamp(float(x), self._tz))
                    for x in times
                ]
            )
        except Exception:  # a tariff that cannot be evaluated prices nothing
            imp = np.zeros(n)
        exp = np.full(n, tariff.export_price_per_kwh)
        return Forecast(
            start=now,
            step_s=ctl.step_s,
            load_w=np.full(n, 0.0 if net is None or not math.isfinite(net) else net),
            pv_w=np.zeros(n),
            import_price=np.where(np.isfinite(imp), imp, 0.0),
            export_price=np.minimum(np.where(np.isfinite(exp), exp, 0.0), imp),
            carbon_g_per_kwh=np.full(n, self._settings.forecast.carbon_intensity_g_per_kwh),
        )


def measured_pv(snapshot: Snapshot) -> float | None:
    """PV power measured by the units themselves (``pv_power_w`` of a profile), W, or None."""
    values = [
        r.extras["pv_power_w"].value
        for r in snapshot.batteries.values()
        if "pv_power_w" in r.extras and r.extras["pv_power_w"].valid
    ]
    return float(sum(v for v in values if v is not None)) if values else None


def sanitize(forecast: Forecast, make_safe: Callable[[], Forecast]) -> tuple[Forecast, list[str]]:
    """``forecast`` with every non-finite value (and negative PV or carbon) replaced by the
    value of the safe forecast ``make_safe()`` for that step (built only when needed); also
    the names of the series that needed it."""
    names = ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")
    steps = len(forecast.load_w)

    def wrong_at(name: str, arr: np.ndarray) -> np.ndarray:
        wrong: np.ndarray = ~np.isfinite(arr)
        if name in _NON_NEGATIVE:
            wrong |= np.nan_to_num(arr, nan=0.0) < 0
        return wrong

    current = {n: np.asarray(getattr(forecast, n), dtype=np.float64) for n in names}
    if all(a.shape == (steps,) and not wrong_at(n, a).any() for n, a in current.items()):
        return forecast, []
    safe = make_safe()
    bad: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        arr = current[name]
        fallback = np.asarray(getattr(safe, name), dtype=np.float64)
        if arr.shape != fallback.shape:
            bad.append(name)
            arrays[name] = fallback
            continue
        wrong = wrong_at(name, arr)
        if wrong.any():
            bad.append(name)
            arr = np.where(wrong, fallback, arr)
        arrays[name] = arr
    if not bad:
        return forecast, bad
    spread = forecast.load_spread_w
    if spread is not None and not np.all(np.isfinite(spread)):
        spread = None
    return Forecast(
        start=forecast.start, step_s=forecast.step_s, **arrays, load_spread_w=spread
    ), bad
