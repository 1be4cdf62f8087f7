"""Generate the example histories of ``essd backtest`` (profiles/backtest/*.csv).

Two sites, 28 days each (2025-05-18 to 2025-06-15, Europe/Berlin, 15-minute steps; the last
14 days are a billing month of their own from 1 June, so a demand charge scored over them is
June's peak for every contender):

- ``household``: a house with an 8 kWp PV roof (south, 35 deg) near Berlin; load from the
  BDEW H0 standard load profile (dynamised) for 4 200 kWh a year;
- ``commercial``: an office/retail building with 120 kWp PV (south-west, 15 deg) near
  Stuttgart; load from the BDEW G1 profile (weekdays 08-18) for 650 MWh a year.

Public models only: the load shapes are the BDEW standard load profiles as demandlib ships
them, and PV is pvlib's Ineichen clear-sky irradiance transposed to the module plane, times a
cloud process (a day regime, clear / broken / overcast, as a Markov chain, and within the day
an AR(1) clearness around the regime's mean), times system losses. A single household is
spikier than the BDEW average of many: the household load gets multiplicative AR(1) noise
and random appliance bursts (kettle, oven, washing machine); the commercial load gets milder
noise and occasional HVAC/compressor bursts. Seeded, so the output is reproducible.

Needs pvlib and demandlib (``pip install pvlib demandlib``); run from the repository root:

    python scripts/make_backtest_histories.py
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pvlib

OUT = Path(__file__).parents[1] / "profiles" / "backtest"
TZ = "Europe/Berlin"
START = pd.Timestamp("2025-05-18 00:00", tz=TZ)
DAYS = 28
STEP = "15min"


@dataclass(frozen=True)
class Site:
    name: str
    lat: float
    lon: float
    tilt: float
    azimuth: float
    kwp: float
    profile: str
    annual_kwh: float
    noise_sd: float
    burst_rate_per_h: float
    burst_w: tuple[float, float]
    seed: int


SITES = (
    Site("household", 52.40, 13.06, 35.0, 180.0, 8.0, "h0_dyn", 4200.0, 0.25, 0.35, (800, 2500), 7),
    Site(
        "commercial", 48.78, 9.18, 15.0, 225.0, 120.0, "g1", 650_000.0, 0.06, 0.25, (8e3, 30e3), 11
    ),
)

# Day regimes: mean clearness, spread within the day, and the Markov transition matrix.
REGIMES = np.array([0.92, 0.6, 0.25])
SPREAD = np.array([0.04, 0.22, 0.10])
TRANSITION = np.array([[0.6, 0.3, 0.1], [0.3, 0.45, 0.25], [0.2, 0.4, 0.4]])
LOSSES = 0.86


def standard_load(profile: str, annual_kwh: float, index: pd.DatetimeIndex) -> np.ndarray:
    """The BDEW profile (demandlib) in W on ``index``, German public holidays as Sundays."""
    from demandlib import bdew  # noqa: PLC0415 - optional, only for this script

    holidays = {
        pd.Timestamp("2025-05-01").date(): "Tag der Arbeit",
        pd.Timestamp("2025-05-29").date(): "Christi Himmelfahrt",
        pd.Timestamp("2025-06-09").date(): "Pfingstmontag",
    }
    # demandlib 0.2 turns every warning into an error inside its constructor, and pandas 3
    # warns about its use of inplace=: keep its filter change from taking effect.
    simplefilter = warnings.simplefilter
    warnings.simplefilter = lambda *a, **k: None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            slp = bdew.ElecSlp(2025, holidays=holidays)
            frame = slp.get_scaled_profiles({profile: annual_kwh})
    finally:
        warnings.simplefilter = simplefilter  # type: ignore[assignment]
    series = frame[profile]  # kWh per quarter hour, local wall time without zone
    local = index.tz_convert(TZ).tz_localize(None)
    return series.reindex(local).to_numpy() * 4000.0


def clearness(rng: np.random.Generator, index: pd.DatetimeIndex) -> np.ndarray:
    """Clearness index per step: day regime (Markov chain) plus AR(1) variation."""
    days = index.tz_convert(TZ).normalize()
    out = np.empty(len(index))
    state = 0
    current = None
    ar = 0.0
    for k, day in enumerate(days):
        if day != current:
            current = day
            state = int(rng.choice(3, p=TRANSITION[state]))
        ar = 0.85 * ar + rng.normal(0.0, SPREAD[state] * np.sqrt(1 - 0.85**2))
        out[k] = np.clip(REGIMES[state] + ar, 0.05, 1.05)
    return out


def pv_power(site: Site, index: pd.DatetimeIndex, kt: np.ndarray) -> np.ndarray:
    """PV AC power, W: Ineichen clear-sky on the module plane x clearness x losses."""
    # Each value is the average over its step: evaluate at mid-step.
    mid = index + pd.Timedelta(minutes=7.5)
    loc = pvlib.location.Location(site.lat, site.lon, tz=TZ)
    sun = loc.get_solarposition(mid)
    cs = loc.get_clearsky(mid, model="ineichen", solar_position=sun)
    poa = pvlib.irradiance.get_total_irradiance(
        site.tilt,
        site.azimuth,
        sun["apparent_zenith"],
        sun["azimuth"],
        cs["dni"],
        cs["ghi"],
        cs["dhi"],
    )["poa_global"].to_numpy()
    return np.maximum(site.kwp * poa * kt * LOSSES, 0.0)


def noisy_load(site: Site, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """The standard profile with multiplicative AR(1) noise and random bursts."""
    n = len(base)
    ar = np.zeros(n)
    for k in range(1, n):
        ar[k] = 0.7 * ar[k - 1] + rng.normal(0.0, site.noise_sd * np.sqrt(1 - 0.49))
    load = base * np.exp(ar)
    bursts = rng.random(n) < site.burst_rate_per_h / 4.0
    load += bursts * rng.uniform(*site.burst_w, size=n)
    return np.round(load, 1)


def write(site: Site) -> Path:
    rng = np.random.default_rng(site.seed)
    index = pd.date_range(START, periods=DAYS * 96, freq=STEP)
    load = noisy_load(site, rng, standard_load(site.profile, site.annual_kwh, index))
    pv = np.round(pv_power(site, index, clearness(rng, index)), 1)
    path = OUT / f"{site.name}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["time", "load_w", "pv_w"])
        for t, ld, p in zip(index, load, pv, strict=True):
            w.writerow([t.isoformat(), f"{ld:.1f}", f"{p:.1f}"])
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for site in SITES:
        print(write(site))  # noqa: T201 - a script reports what it wrote


if __name__ == "__main__":
    main()
