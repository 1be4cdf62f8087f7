"""A scenario's true series: written as the CSV the daemon's forecaster reads, and sampled as
functions of time for the plant (load and PV interpolated linearly, prices held).
Units: W, prices per kWh, carbon g/kWh.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from essd.config import ForecastConfig, Settings
from essd.forecast import Forecaster
from essd.hil.scenario import Scenario

__all__ = ["ScenarioSeries"]


class ScenarioSeries:
    """The scenario's true series, as a CSV the forecaster reads and as functions of time."""

    def __init__(self, scenario: Scenario, settings: Settings, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "series.csv"
        spec = scenario.series
        if spec.file is not None:
            self.path.write_text(
                scenario.resolve(spec.file).read_text(encoding="utf-8"), encoding="utf-8"
            )
        else:
            inline = spec.inline
            assert inline is not None
            cols = [
                c
                for c in ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")
                if getattr(inline, c)
            ]
            with self.path.open("w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["time", *cols])
                for k in range(len(inline.load_w)):
                    t = scenario.start_epoch + k * inline.step_s
                    w.writerow([f"{t:.0f}", *(getattr(inline, c)[k] for c in cols)])
        # Prices are read through the daemon's own forecaster (the same file, the same tariff
        # fallback): a price holds until the next sample. Load and PV are interpolated linearly
        # between samples, as hil_sim does: a real load does not jump every quarter hour.
        self._tz = ZoneInfo(settings.site.timezone)
        source = ForecastConfig(
            load="file",
            pv="file",
            series_file=self.path,
            carbon_intensity_g_per_kwh=settings.forecast.carbon_intensity_g_per_kwh,
        )
        self._truth = Forecaster(source, settings.tariff, settings.site.timezone)
        self._truth_carbon_default = settings.forecast.carbon_intensity_g_per_kwh
        self._table = _read_table(self.path, self._tz)
        times, _, columns = self._table
        # Daily profiles wrap around midnight: the day's first sample follows its last.
        self._wrapped = {
            c: (
                np.concatenate([times - 86_400.0, times, times + 86_400.0]),
                np.concatenate([v, v, v]),
            )
            for c, v in columns.items()
        }
        self._cache: dict[float, tuple[float, float, float, float, float]] = {}

    def _linear(self, column: str, t: float) -> float:
        times, daily, cols = self._table
        values = cols.get(column)
        if values is None:
            return 0.0
        if daily:
            day = datetime.fromtimestamp(t, tz=self._tz)
            midnight = day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            xs, ys = self._wrapped[column]
            return float(np.interp(t - midnight, xs, ys))
        return float(np.interp(t, times, values))

    def at(self, t: float) -> tuple[float, float, float, float, float]:
        """(load W, PV W, import price, export price, carbon g/kWh) at epoch ``t``."""
        hit = self._cache.get(t)
        if hit is None:
            f = self._truth.forecast(t, 60.0, 1)
            hit = (
                self._linear("load_w", t),
                self._linear("pv_w", t),
                float(f.import_price[0]),
                float(f.export_price[0]),
                float(f.carbon_g_per_kwh[0]),
            )
            self._cache[t] = hit
        return hit

    def write_forecast(self, path: Path, start: float, end: float, step_s: float) -> ForecastConfig:
        """The truth resampled every ``step_s`` from ``start`` to ``end`` as the daemon's series
        file ("perfect" forecasts: the daemon holds each sample, so a fine resampling keeps its
        view of the linear truth close)."""
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["time", *_COLUMNS])
            t = start
            while t <= end:
                w.writerow([f"{t:.0f}", *(f"{v:.6g}" for v in self.at(t))])
                t += step_s
        return ForecastConfig(
            load="file",
            pv="file",
            series_file=path,
            carbon_intensity_g_per_kwh=self._truth_carbon_default,
        )

    def load_w(self, t: float) -> float:
        """True load (W)."""
        return self.at(t)[0]

    def pv_w(self, t: float) -> float:
        """True available PV (W)."""
        return self.at(t)[1]


def _read_table(
    path: Path, tz: ZoneInfo
) -> tuple[npt.NDArray[np.float64], bool, dict[str, npt.NDArray[np.float64]]]:
    """Sample times and load/PV columns of a series CSV; daily files as seconds of the day."""
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    times = []
    for row in rows:
        raw = row["time"]
        try:
            times.append(float(raw))
        except ValueError:
            dt = datetime.fromisoformat(raw)
            times.append((dt if dt.tzinfo else dt.replace(tzinfo=tz)).timestamp())
    t = np.asarray(times, dtype=np.float64)
    cols = {
        c: np.asarray([float(r[c]) for r in rows], dtype=np.float64)
        for c in ("load_w", "pv_w")
        if rows and c in rows[0]
    }
    daily = float(t[-1] - t[0]) < 86_400.0
    if daily:
        first = datetime.fromtimestamp(float(t[0]), tz=tz)
        midnight = first.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        offsets = (t - midnight) % 86_400.0
        order = np.argsort(offsets)
        t = offsets[order]
        cols = {c: v[order] for c, v in cols.items()}
    return t, daily, cols


_COLUMNS = ("load_w", "pv_w", "import_price", "export_price", "carbon_g_per_kwh")
