"""The online sources, each through its maintained client library (imported only when used).

- :class:`NordPoolPrices`: Nord Pool day-ahead prices through ``pynordpool`` (async, aiohttp);
  today's and tomorrow's delivery days (CET), per MWh in the tariff's currency.
- :class:`ForecastSolarPv`: Forecast.Solar's PV estimate for the site's array through
  ``forecast-solar`` (async, aiohttp); times in UTC, energy per period in Wh.

Each source's ``fetch(session, now)`` returns the series it provides by quantity
(``import_price``, ``export_price``, ``pv_w``), or raises: :class:`OnlineDataError` for a
response it refuses, the library's own errors (or aiohttp's) for a failed request.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from essd.config import (
    OnlinePricesConfig,
    OnlinePvConfig,
    OnlineSourceConfig,
    PvArrayConfig,
    Settings,
)
from essd.config_loading import ConfigError
from essd.forecast import OnlineSeries
from essd.online.parse import OnlineDataError, online_series, price_series, pv_series

if TYPE_CHECKING:
    from aiohttp import ClientSession

#: Environment variable with a Forecast.Solar API key (when ``api_key_file`` is not given).
FORECAST_SOLAR_KEY_ENV = "FORECAST_SOLAR_API_KEY"
_CET = ZoneInfo("Europe/Oslo")  # Nord Pool's delivery days are CET/CEST days


class OnlineSource(Protocol):
    """One online source: its name, its config section, and one fetch."""

    name: str

    @property
    def config(self) -> OnlineSourceConfig:
        """The source's config section."""

    async def fetch(self, session: ClientSession, now: float) -> dict[str, OnlineSeries]:
        """The series this source provides, by quantity; raises on any failure."""


class NordPoolPrices:
    """Day-ahead prices for one Nord Pool delivery area."""

    name = "nordpool"

    def __init__(self, config: OnlinePricesConfig, currency: str) -> None:
        self.config = config
        self.currency = currency

    async def fetch(self, session: ClientSession, now: float) -> dict[str, OnlineSeries]:
        """Today's and (once published) tomorrow's prices, per kWh with the site's adders."""
        from pynordpool import Currency, NordPoolClient  # noqa: PLC0415 - only when enabled

        cfg = self.config
        client = NordPoolClient(session, timeout=math.ceil(cfg.timeout_s))
        today = datetime.fromtimestamp(now, tz=_CET).replace(
            hour=12, minute=0, second=0, microsecond=0
        )
        days = await client.async_get_delivery_periods(
            [today, today + timedelta(days=1)], Currency(self.currency), [cfg.area]
        )
        if not days.entries:
            raise OnlineDataError(self.name, "multiAreaEntries", "no delivery day published")
        for day in days.entries.values():
            if day.currency != self.currency:
                raise OnlineDataError(
                    self.name, "currency", f"got {day.currency!r}, the tariff is in {self.currency}"
                )
        start, step, spot = price_series(
            self.name,
            [(e.start, e.end, e.entry) for day in days.entries.values() for e in day.entries],
            area=cfg.area,
            now=now,
        )

        def priced(scale: float, adder: float) -> OnlineSeries:
            values = spot * scale + adder
            return online_series(self.name, start, step, values, now=now, max_age_s=cfg.max_age_s)

        out = {"import_price": priced(cfg.import_scale, cfg.import_adder_per_kwh)}
        if cfg.export:
            out["export_price"] = priced(cfg.export_scale, cfg.export_adder_per_kwh)
        return out


def read_api_key(config: OnlinePvConfig, environ: dict[str, str] | None = None) -> str | None:
    """The Forecast.Solar API key: ``api_key_file``, else the environment, else None (the
    public API). ConfigError naming the field when the file cannot be read or is empty."""
    path: Path | None = config.api_key_file
    if path is None:
        key = (os.environ if environ is None else environ).get(FORECAST_SOLAR_KEY_ENV, "")
        return key.strip() or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"forecast.online.pv.api_key_file: cannot read {path}: {exc}"]) from None
    if not key:
        raise ConfigError([f"forecast.online.pv.api_key_file: {path} is empty"])
    return key


class ForecastSolarPv:
    """Forecast.Solar's estimate for the site's array (one plane)."""

    name = "forecast.solar"

    def __init__(
        self, config: OnlinePvConfig, array: PvArrayConfig, api_key: str | None = None
    ) -> None:
        self.config = config
        self.array = array
        self.api_key = api_key

    async def fetch(self, session: ClientSession, now: float) -> dict[str, OnlineSeries]:
        """The estimate as average W per ``step_s``."""
        from forecast_solar import ForecastSolar  # noqa: PLC0415 - only when enabled

        a = self.array
        # Forecast.Solar's azimuth: -180..180 from south, west positive; essd's: from north.
        azimuth = a.azimuth_deg % 360.0 - 180.0
        client = ForecastSolar(
            latitude=a.latitude,
            longitude=a.longitude,
            declination=a.tilt_deg,
            azimuth=azimuth,
            kwp=a.kwp,
            damping=self.config.damping,
            api_key=self.api_key,
            session=session,
        )
        try:
            estimate = await client.estimate()
        except KeyError as exc:  # the library reads the fields without checking them
            raise OnlineDataError(
                self.name, f"{exc.args[0]}", "missing from the response"
            ) from None
        start, step, watts = pv_series(
            self.name, estimate.wh_period, kwp=a.kwp, step_s=self.config.step_s, now=now
        )
        return {
            "pv_w": online_series(
                self.name, start, step, watts, now=now, max_age_s=self.config.max_age_s
            )
        }


def sources_for(settings: Settings, environ: dict[str, str] | None = None) -> list[OnlineSource]:
    """The enabled online sources of ``settings`` (none by default)."""
    online = settings.forecast.online
    out: list[OnlineSource] = []
    if online.prices.enabled:
        out.append(NordPoolPrices(online.prices, settings.tariff.currency))
    if online.pv.enabled:
        array = settings.forecast.pv_array
        assert array is not None  # ForecastConfig refuses online.pv without it
        out.append(ForecastSolarPv(online.pv, array, read_api_key(online.pv, environ)))
    return out
