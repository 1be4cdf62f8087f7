"""A scenario's true series: written as the CSV the daemon's forecaster reads, and sampled as
functions of time for the plant (load and PV interpolated linearly unless the scenario says its
series are step averages, ``series.hold``; prices held).
Units: W, prices per kWh, carbon g/kWh.
"""

from __future__ import annotations

import csv
from pathlib import Path
from zoneinfo import ZoneInfo

from essd.config import ForecastConfig, Settings
from essd.forecast import Forecaster
from essd.hil.scenario import Scenario
from essd.series import SERIES_COLUMNS, read_series_csv
from hil_sim.site import SiteSeries


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
            cols = [c for c in SERIES_COLUMNS if getattr(inline, c)]
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
        # The same reader and interpolation as the simulator (daily profiles wrap at midnight).
        times, columns = read_series_csv(self.path, self._tz)
        self._plant_series = SiteSeries(
            times,
            {c: v for c, v in columns.items() if c in ("load_w", "pv_w")},
            tz=self._tz,
            source=str(self.path),
            hold=spec.hold,
        )
        self._cache: dict[float, tuple[float, float, float, float, float]] = {}

    def at(self, t: float) -> tuple[float, float, float, float, float]:
        """(load W, PV W, import price, export price, carbon g/kWh) at epoch ``t``."""
        hit = self._cache.get(t)
        if hit is None:
            f = self._truth.forecast(t, 60.0, 1)
            hit = (
                self._plant_series.value("load_w", t),
                self._plant_series.value("pv_w", t),
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
            w.writerow(["time", *SERIES_COLUMNS])
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
