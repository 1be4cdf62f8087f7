"""Online forecast sources (adapter layer): day-ahead prices and a PV forecast, each fetched
through its maintained client library by a background task, never inside the control cycle.

A fetch is turned into plain :class:`essd.forecast.OnlineSeries` (start, step, values in
essd's units) and handed to the forecaster, which uses it while it covers the horizon and has
not expired, and its built-in source elsewhere. A bad response is refused whole with an
:class:`OnlineDataError` naming the source and the field; the last good series stays in use
until it expires. Every source is off unless its config section enables it.
"""

from essd.online.parse import OnlineDataError, price_series, pv_series
from essd.online.runner import OnlineForecasts, SourceStatus
from essd.online.sources import ForecastSolarPv, NordPoolPrices, OnlineSource, sources_for

__all__ = [
    "ForecastSolarPv",
    "NordPoolPrices",
    "OnlineDataError",
    "OnlineForecasts",
    "OnlineSource",
    "SourceStatus",
    "price_series",
    "pv_series",
    "sources_for",
]
