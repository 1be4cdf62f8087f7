"""The online sources' client libraries (pynordpool, forecast-solar) driven against a real
local HTTPS server serving responses written in the APIs' format (tests/data/online/, not
recordings: this machine has no internet): parsing to essd series, unit conversion, and
every kind of bad response refused with an error naming the source and the field."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from essd.config import OnlinePricesConfig, OnlinePvConfig, PvArrayConfig
from essd.config_loading import ConfigError
from essd.online import ForecastSolarPv, NordPoolPrices, OnlineDataError, pv_series
from essd.online.sources import FORECAST_SOLAR_KEY_ENV, read_api_key
from tests.support.online_api import FakeApis, recorded, serve_apis

DAY = "2026-03-10"
NORDPOOL = recorded(f"nordpool_dayahead_{DAY}_SE3_EUR.json")
ESTIMATE = recorded("forecastsolar_estimate_2026-06-15.json")
# 10:00 CET on the delivery day.
PRICES_NOW = datetime(2026, 3, 10, 9, 0, tzinfo=UTC).timestamp()
PV_NOW = datetime(2026, 6, 15, 9, 30, tzinfo=UTC).timestamp()
ARRAY = PvArrayConfig(latitude=52.16, longitude=4.47, tilt_deg=30, azimuth_deg=180, kwp=5.0)


def _t(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _next_day(body: dict[str, Any], shift_eur: float) -> dict[str, Any]:
    """The recorded day moved one day on, its prices shifted by ``shift_eur``."""
    out = copy.deepcopy(body)
    day = datetime.fromisoformat(out["deliveryDateCET"]) + timedelta(days=1)
    out["deliveryDateCET"] = day.date().isoformat()
    for e in out["multiAreaEntries"]:
        for key in ("deliveryStart", "deliveryEnd"):
            t = datetime.fromisoformat(e[key].replace("Z", "+00:00")) + timedelta(days=1)
            e[key] = t.strftime("%Y-%m-%dT%H:%M:%SZ")
        e["entryPerArea"]["SE3"] = round(e["entryPerArea"]["SE3"] + shift_eur, 2)
    return out


async def _prices(apis: FakeApis, currency: str = "EUR", **cfg: Any) -> dict[str, Any]:
    source = NordPoolPrices(OnlinePricesConfig(enabled=True, area="SE3", **cfg), currency)
    async with apis.session() as session:
        return await source.fetch(session, PRICES_NOW)


async def test_nordpool_day_ahead_prices_become_per_kwh_series_with_the_sites_adders() -> None:
    async with serve_apis() as apis:
        apis.nordpool_days[DAY] = NORDPOOL
        got = await _prices(
            apis, import_scale=1.25, import_adder_per_kwh=0.05, export=True, export_scale=0.9
        )
    entries = NORDPOOL["multiAreaEntries"]
    per_mwh = np.array([e["entryPerArea"]["SE3"] for e in entries])
    imp, exp = got["import_price"], got["export_price"]
    assert imp.source == "nordpool"
    assert imp.start == _t(entries[0]["deliveryStart"])  # 2026-03-09T23:00Z, 00:00 CET
    assert imp.step_s == 900.0  # the 15-minute market time unit
    assert len(imp.values) == 96
    np.testing.assert_allclose(imp.values, per_mwh / 1000.0 * 1.25 + 0.05)
    np.testing.assert_allclose(exp.values, per_mwh / 1000.0 * 0.9)
    assert (per_mwh < 0).any()  # negative prices are real prices
    assert (exp.values < 0).any()
    assert imp.fetched_at == PRICES_NOW
    assert imp.expires_at == PRICES_NOW + 172_800.0
    # What the library asked for: today and tomorrow (CET), the area and the currency.
    asked = [q for path, q in apis.requests if path == "/api/DayAheadPrices"]
    assert [q["date"] for q in asked] == ["2026-03-10", "2026-03-11"]
    assert {(q["deliveryArea"], q["currency"], q["market"]) for q in asked} == {
        ("SE3", "EUR", "DayAhead")
    }


async def test_tomorrows_prices_once_published_extend_the_series() -> None:
    async with serve_apis() as apis:
        apis.nordpool_days[DAY] = NORDPOOL
        apis.nordpool_days["2026-03-11"] = _next_day(NORDPOOL, 10.0)
        got = await _prices(apis)
    imp = got["import_price"]
    assert "export_price" not in got  # the export price stays the tariff's unless asked
    assert len(imp.values) == 192
    assert imp.end == _t("2026-03-11T23:00:00Z")
    np.testing.assert_allclose(imp.values[96:] - imp.values[:96], 0.010, atol=1e-9)


def _serve_body(body: dict[str, Any]) -> Any:
    def hook(request: web.Request) -> web.StreamResponse | None:
        if request.query.get("date") != DAY:
            return web.Response(status=204)
        return web.Response(text=json.dumps(body), content_type="application/json")

    return hook


def _with_entry(change: Any) -> dict[str, Any]:
    body = copy.deepcopy(NORDPOOL)
    change(body["multiAreaEntries"])
    return body


@pytest.mark.parametrize(
    ("body", "currency", "field", "problem"),
    [
        (NORDPOOL, "SEK", "currency", "got 'EUR', the tariff is in SEK"),
        (
            _with_entry(lambda es: es[5]["entryPerArea"].pop("SE3")),
            "EUR",
            "multiAreaEntries.5.entryPerArea.SE3",
            "got None",
        ),
        (
            _with_entry(lambda es: es[7]["entryPerArea"].update(SE3=math.nan)),
            "EUR",
            "multiAreaEntries.7.entryPerArea.SE3",
            "got nan",
        ),
        (
            _with_entry(lambda es: es[7]["entryPerArea"].update(SE3="41.2")),
            "EUR",
            "multiAreaEntries.7.entryPerArea.SE3",
            "got '41.2'",
        ),
        (_with_entry(lambda es: es.pop(40)), "EUR", "multiAreaEntries.40.deliveryStart", "gap"),
        (_with_entry(lambda es: es.clear()), "EUR", "multiAreaEntries", "no delivery periods"),
    ],
    ids=["wrong-currency", "area-missing", "nan", "text", "gap", "empty"],
)
async def test_a_bad_price_response_is_refused_naming_the_field(
    body: dict[str, Any], currency: str, field: str, problem: str
) -> None:
    async with serve_apis() as apis:
        apis.hook = _serve_body(body)
        with pytest.raises(OnlineDataError) as info:
            await _prices(apis, currency=currency)
    assert info.value.source == "nordpool"
    assert info.value.field == field
    assert str(info.value).startswith(f"nordpool: {field}: ")
    assert problem in str(info.value)


async def test_prices_that_are_all_in_the_past_are_stale() -> None:
    async with serve_apis() as apis:
        # Asked for the 12th, the portal answers with the 10th's periods (a stale cache).
        apis.hook = lambda request: (
            web.json_response(NORDPOOL)
            if request.query["date"] == "2026-03-12"
            else web.Response(status=204)
        )
        source = NordPoolPrices(OnlinePricesConfig(enabled=True, area="SE3"), "EUR")
        async with apis.session() as session:
            with pytest.raises(OnlineDataError, match=r"nordpool: multiAreaEntries: stale"):
                await source.fetch(session, PRICES_NOW + 2 * 86_400)


async def test_no_published_day_is_an_error_not_an_empty_series() -> None:
    async with serve_apis() as apis:  # every date answers 204, as before publication
        with pytest.raises(OnlineDataError, match="no delivery day published"):
            await _prices(apis)


async def _estimate(
    apis: FakeApis, array: PvArrayConfig = ARRAY, now: float = PV_NOW, key: str | None = None
) -> dict[str, Any]:
    source = ForecastSolarPv(OnlinePvConfig(enabled=True, damping=0.1), array, key)
    async with apis.session() as session:
        return await source.fetch(session, now)


async def test_forecast_solar_energy_per_period_becomes_average_watts_per_step() -> None:
    async with serve_apis() as apis:
        apis.estimate = ESTIMATE
        got = await _estimate(apis)
    pv = got["pv_w"]
    periods = {_t(k): v for k, v in ESTIMATE["result"]["watt_hours_period"].items()}
    times = sorted(periods)
    assert pv.source == "forecast.solar"
    assert pv.step_s == 900.0
    assert pv.start == math.floor(times[0] / 900) * 900  # 03:15Z, the step of sunrise
    assert pv.end == math.ceil(times[-1] / 900) * 900
    assert (pv.values >= 0).all()
    # Energy is kept: the steps' Wh add up to the periods' Wh.
    assert float(pv.values.sum() * 0.25) == pytest.approx(sum(periods.values()), rel=1e-9)
    # Within a whole hour the energy is spread evenly: each quarter averages the hour's Wh as W.
    noon_hour = _t("2026-06-15T12:00:00+00:00")
    k = int((noon_hour - 3600 - pv.start) // 900)
    np.testing.assert_allclose(pv.values[k : k + 4], periods[noon_hour])
    # Overnight (between the days' last and first times) there is nothing.
    night = int((_t("2026-06-16T00:00:00+00:00") - pv.start) // 900)
    assert pv.values[night] == 0.0
    assert pv.expires_at == PV_NOW + 10_800.0
    # The array went out in Forecast.Solar's terms: azimuth 0 = south; times in UTC.
    path, query = apis.requests[0]
    assert path == "/estimate/52.16/4.47/30.0/0.0/5.0"
    assert query["time"] == "utc"
    assert query["damping"] == "0.1"


async def test_azimuth_east_and_an_api_key_reach_the_api() -> None:
    east = ARRAY.model_copy(update={"azimuth_deg": 90.0})
    async with serve_apis() as apis:
        apis.estimate = ESTIMATE
        await _estimate(apis, east, key="k3y")
    assert apis.requests[0][0] == "/k3y/estimate/52.16/4.47/30.0/-90.0/5.0"


def _with_periods(change: Any) -> dict[str, Any]:
    body = copy.deepcopy(ESTIMATE)
    change(body["result"])
    return body


def _scale(result: dict[str, Any], factor: float) -> None:
    result["watt_hours_period"] = {k: v * factor for k, v in result["watt_hours_period"].items()}


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        (
            _with_periods(
                lambda r: r["watt_hours_period"].update({"2026-06-15T09:00:00+00:00": -3})
            ),
            "result.watt_hours_period.2026-06-15T09:00:00+00:00",
            "negative",
        ),
        (
            _with_periods(
                lambda r: r["watt_hours_period"].update({"2026-06-15T09:00:00+00:00": None})
            ),
            "result.watt_hours_period.2026-06-15T09:00:00+00:00",
            "expected Wh, got None",
        ),
        (_with_periods(lambda r: _scale(r, 1000.0)), "result.watt_hours_period.", "wrong units"),
        (_with_periods(lambda r: r.pop("watt_hours_period")), "watt_hours_period", "missing"),
    ],
    ids=["negative", "null", "units", "missing"],
)
async def test_a_bad_pv_response_is_refused_naming_the_field(
    body: dict[str, Any], field: str, problem: str
) -> None:
    async with serve_apis() as apis:
        apis.estimate = body
        with pytest.raises(OnlineDataError) as info:
            await _estimate(apis)
    assert info.value.source == "forecast.solar"
    assert info.value.field.startswith(field)
    assert problem in str(info.value)


async def test_a_pv_forecast_that_ended_is_stale() -> None:
    async with serve_apis() as apis:
        apis.estimate = ESTIMATE
        with pytest.raises(
            OnlineDataError, match=r"forecast.solar: result.watt_hours_period: stale"
        ):
            await _estimate(apis, now=PV_NOW + 3 * 86_400)


def test_the_api_key_comes_from_its_file_or_the_environment(tmp_path: Path) -> None:
    key = tmp_path / "forecast-solar.key"
    key.write_text("s3cret\n")
    assert read_api_key(OnlinePvConfig(api_key_file=key), {}) == "s3cret"
    assert read_api_key(OnlinePvConfig(), {FORECAST_SOLAR_KEY_ENV: " env-key "}) == "env-key"
    assert read_api_key(OnlinePvConfig(), {}) is None  # the public API
    key.write_text("  \n")
    with pytest.raises(ConfigError, match=r"forecast.online.pv.api_key_file: .* is empty"):
        read_api_key(OnlinePvConfig(api_key_file=key), {})
    with pytest.raises(ConfigError, match=r"forecast.online.pv.api_key_file: cannot read"):
        read_api_key(OnlinePvConfig(api_key_file=tmp_path / "absent"), {})


def _utc(h: int, m: int, s: int = 0) -> datetime:
    return datetime(2026, 6, 15, h, m, s, tzinfo=UTC)


def test_energy_per_period_is_spread_evenly_over_its_period_and_averaged_per_step() -> None:
    # 750 Wh from 10:05 to 10:50 is 1000 W for 45 minutes.
    start, step, watts = pv_series(
        "fs", {_utc(10, 5): 0, _utc(10, 50): 750}, kwp=1.0, step_s=900.0, now=0.0
    )
    assert start == _utc(10, 0).timestamp()
    assert step == 900.0
    np.testing.assert_allclose(watts, [1000 * 10 / 15, 1000.0, 1000.0, 1000 * 5 / 15])
    # Hourly steps: the same energy as one hour's average.
    _, _, hourly = pv_series(
        "fs", {_utc(10, 5): 0, _utc(10, 50): 750}, kwp=1.0, step_s=3600.0, now=0.0
    )
    np.testing.assert_allclose(hourly, [750.0])


def test_a_sunrise_period_of_seconds_is_not_taken_for_wrong_units() -> None:
    # 1 Wh (the API's rounding) in 2 s would be 1800 W on a 1 kWp array: within the slack.
    _, _, watts = pv_series(
        "fs",
        {_utc(4, 59, 58): 0, _utc(5, 0): 1, _utc(6, 0): 400},
        kwp=1.0,
        step_s=900.0,
        now=0.0,
    )
    assert float(watts.sum() * 0.25) == pytest.approx(401.0)
    # The first time only starts the series, whatever energy it carries.
    _, _, first = pv_series("fs", {_utc(5, 0): 77, _utc(6, 0): 400}, kwp=1.0, step_s=3600, now=0)
    np.testing.assert_allclose(first, [400.0])
    with pytest.raises(OnlineDataError, match=r"fs: result\.watt_hours_period: fewer than two"):
        pv_series("fs", {_utc(5, 0): 0}, kwp=1.0, step_s=900.0, now=0.0)
    with pytest.raises(OnlineDataError, match="times must increase"):
        pv_series("fs", {_utc(6, 0): 0, _utc(5, 0): 3}, kwp=1.0, step_s=900.0, now=0.0)
