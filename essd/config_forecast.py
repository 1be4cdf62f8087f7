"""Configuration sections for prices and forecasts (``[tariff]``, ``[forecast]``); part of
:mod:`essd.config`, which re-exports them. Units: prices per kWh in the tariff's currency (per
kW and month for the demand charge), carbon in g/kWh, angles in degrees, PV in kWp.
"""

from __future__ import annotations

from datetime import date, time
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    # allow_inf_nan=False: every float in the configuration is finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TouWindow(_Section):
    """A time-of-use window starting at ``start`` (local time) until the next one."""

    start: time
    price_per_kwh: Annotated[float, Field(allow_inf_nan=False)]


class TariffConfig(_Section):
    """Prices. A flat import price or a time-of-use table (exactly one)."""

    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = Field(
        description="ISO 4217 code of the tariff's currency, e.g. EUR (required)"
    )
    import_price_per_kwh: Annotated[float, Field(allow_inf_nan=False)] | None = None
    import_tou: tuple[TouWindow, ...] = ()
    import_tou_weekend: tuple[TouWindow, ...] = Field(
        (), description="Time-of-use table for weekends and holidays (default: import_tou)"
    )
    holidays: tuple[date, ...] = Field((), description="Dates priced and forecast as Sundays")
    export_price_per_kwh: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    demand_charge_per_kw: Annotated[float, Field(ge=0.0)] = 0.0
    demand_window_s: Annotated[float, Field(ge=60.0, le=3600.0)] | None = Field(
        None,
        description=(
            "Length (s) of the clock-aligned windows whose average import the demand charge"
            " bills, dividing the hour (e.g. 900: 15 minutes); default: control.step_s"
        ),
    )
    demand_headroom_ratio: Ratio = Field(
        0.05, description="Plans keep the import this far below the running billed peak"
    )
    carbon_price_per_kg: Annotated[float, Field(ge=0.0)] = 0.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.import_price_per_kwh is None) == (not self.import_tou):
            raise ValueError("import_price_per_kwh: give either it or import_tou, not both")
        if self.demand_window_s is not None and 3600.0 % self.demand_window_s != 0.0:
            raise ValueError("demand_window_s: must divide the hour (e.g. 300, 900, 1800, 3600)")
        if self.import_tou_weekend and not self.import_tou:
            raise ValueError("import_tou_weekend: only with import_tou")
        for name in ("import_tou", "import_tou_weekend"):
            starts = [w.start for w in getattr(self, name)]
            if starts:
                if starts != sorted(set(starts)):
                    raise ValueError(f"{name}: start times must be increasing and unique")
                if starts[0] != time(0, 0):
                    raise ValueError(f"{name}: the first window must start at 00:00")
        return self


class PvArrayConfig(_Section):
    """The site's PV array, for the clear-sky PV forecaster."""

    latitude: Annotated[float, Field(ge=-90.0, le=90.0)]
    longitude: Annotated[float, Field(ge=-180.0, le=180.0)]
    tilt_deg: Annotated[float, Field(ge=0.0, le=90.0)] = 30.0
    azimuth_deg: Annotated[float, Field(ge=0.0, le=360.0)] = Field(
        180.0, description="Direction the modules face, degrees from north (180 = south)"
    )
    kwp: Annotated[float, Field(gt=0.0)]
    losses: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.86, description="AC output per kWp at 1 kW/m2 on the module plane (ratio)"
    )


#: Nord Pool's day-ahead delivery areas and currencies (pynordpool's AREAS and Currency; a test
#: keeps them in step with the pinned library).
NORDPOOL_AREAS = (
    "EE", "LT", "LV", "AT", "BE", "FR", "GER", "NL", "PL", "DK1", "DK2", "FI",
    "NO1", "NO2", "NO3", "NO4", "NO5", "SE1", "SE2", "SE3", "SE4", "BG", "TEL", "SYS",
)  # fmt: skip
NORDPOOL_CURRENCIES = ("BGN", "DKK", "EUR", "NOK", "PLN", "RON", "SEK")


class OnlineSourceConfig(_Section):
    """What every online source shares: off unless enabled, refreshed in the background."""

    enabled: bool = False
    refresh_s: Annotated[float, Field(ge=60.0, le=86_400.0)] = Field(
        3600.0, description="Seconds between successful fetches"
    )
    retry_s: Annotated[float, Field(ge=1.0, le=86_400.0)] = Field(
        60.0, description="First wait after a failed fetch; doubles per failure up to refresh_s"
    )
    timeout_s: Annotated[float, Field(gt=0.0, le=600.0)] = Field(
        30.0, description="A fetch that takes longer fails"
    )


class OnlinePricesConfig(OnlineSourceConfig):
    """Day-ahead spot prices (Nord Pool, through pynordpool), in the tariff's currency.

    import price = spot x ``import_scale`` + ``import_adder_per_kwh`` (grid fees, taxes); the
    export price follows the spot price only when ``export`` is true.
    """

    source: Literal["nordpool"] = "nordpool"
    area: str = Field("SE3", description="Delivery area, e.g. SE3, DK1, FI, NL, GER")
    max_age_s: Annotated[float, Field(ge=600.0)] = Field(
        172_800.0, description="Fetched prices are used for this long (day-ahead prices are final)"
    )
    import_scale: Annotated[float, Field(gt=0.0)] = 1.0
    import_adder_per_kwh: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    export: bool = False
    export_scale: Annotated[float, Field(gt=0.0)] = 1.0
    export_adder_per_kwh: Annotated[float, Field(allow_inf_nan=False)] = 0.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.area not in NORDPOOL_AREAS:
            raise ValueError(
                f"area: {self.area!r} is not a Nord Pool area ({', '.join(NORDPOOL_AREAS)})"
            )
        return self


class OnlinePvConfig(OnlineSourceConfig):
    """A PV power forecast for ``forecast.pv_array`` (Forecast.Solar, through forecast-solar).

    The public API needs no key; a personal key is read from ``api_key_file`` or the
    environment variable ``ESSD_FORECAST_SOLAR_API_KEY`` (never from this file).
    """

    source: Literal["forecast.solar"] = "forecast.solar"
    max_age_s: Annotated[float, Field(ge=600.0)] = Field(
        10_800.0, description="A PV forecast older than this is no longer used"
    )
    step_s: Annotated[float, Field(ge=300.0, le=3600.0)] = Field(
        900.0, description="The fetched forecast is averaged onto steps this long"
    )
    damping: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    api_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if 86_400 % self.step_s:
            raise ValueError("step_s: must divide a day")
        return self


class OnlineForecastConfig(_Section):
    """Online forecast sources, each off unless enabled (they need the internet)."""

    prices: OnlinePricesConfig = OnlinePricesConfig()
    pv: OnlinePvConfig = OnlinePvConfig()


class ForecastConfig(_Section):
    """Where the forecasts over the horizon come from (MQTT forecasts override them).

    ``week-profile`` (load): weekday and weekend/holiday time-of-day profiles, robust to
    outliers, plus the latest deviation decaying; ``clear-sky`` (pv): pvlib clear-sky power of
    ``pv_array`` times a learned clearness (essd.forecasters).
    """

    load: Literal["daily-profile", "week-profile", "persistence", "file"] = "daily-profile"
    pv: Literal["daily-profile", "clear-sky", "persistence", "file", "none"] = "daily-profile"
    pv_array: PvArrayConfig | None = None
    series_file: Path | None = Field(
        None, description="CSV: time, load_w, pv_w, import_price, export_price, carbon_g_per_kwh"
    )
    carbon_intensity_g_per_kwh: Annotated[float, Field(ge=0.0)] = 581.0
    online: OnlineForecastConfig = OnlineForecastConfig()

    @model_validator(mode="after")
    def _check(self) -> Self:
        if "file" in (self.load, self.pv) and self.series_file is None:
            raise ValueError("series_file: required when load or pv is 'file'")
        if self.pv == "clear-sky" and self.pv_array is None:
            raise ValueError("pv_array: required when pv is 'clear-sky'")
        if self.online.pv.enabled and self.pv_array is None:
            raise ValueError("online.pv: needs pv_array (the array's coordinates and kWp)")
        return self
