"""Online forecasts in essd: the forecaster uses an online series where it covers and has not
expired and its built-in source elsewhere; config refuses what cannot work, naming the field;
the background refresh backs off on a stepped clock and logs transitions only; control cycles
run on through every failure of a source (real library, local server, recorded responses)."""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pynordpool
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from drivers.factory import EndpointPool
from essd.clock import SimClock
from essd.config import ForecastConfig, OnlinePricesConfig, Settings, TariffConfig
from essd.config_forecast import NORDPOOL_AREAS, NORDPOOL_CURRENCIES
from essd.config_loading import ConfigError, load_settings
from essd.daemon import Daemon, build_controller
from essd.domain import PlanCause
from essd.events import CycleCompleted, Event, EventBus
from essd.forecast import Forecaster, OnlineSeries, Override
from essd.metrics import MetricsExporter
from essd.online import OnlineDataError, OnlineForecasts, sources_for
from hil_sim.runner import SimulatedSite
from tests.support.online_api import FakeApis, recorded, serve_apis
from tests.support.site import EXAMPLE, cycles_of

TZ = ZoneInfo("Europe/Stockholm")
TARIFF = TariffConfig(currency="EUR", import_price_per_kwh=0.30, export_price_per_kwh=0.05)
T0 = datetime(2026, 3, 10, 10, 0, tzinfo=TZ).timestamp()


def _series(start: float, values: list[float], *, step_s: float = 900.0, **kw: Any) -> OnlineSeries:
    return OnlineSeries(
        source=kw.get("source", "test"),
        start=start,
        step_s=step_s,
        values=np.array(values, dtype=np.float64),
        fetched_at=kw.get("fetched_at", start),
        expires_at=kw.get("expires_at", start + 86_400.0),
    )


# -- the forecaster -----------------------------------------------------------------------


def test_online_prices_are_used_where_they_cover_and_the_tariff_elsewhere() -> None:
    f = Forecaster(ForecastConfig(), TARIFF, "Europe/Stockholm")
    f.set_online("import_price", _series(T0 + 900, [0.11, 0.12], step_s=900))
    fc = f.forecast(T0, 900, 5)
    assert fc.import_price.tolist() == [0.30, 0.11, 0.12, 0.30, 0.30]
    assert fc.export_price.tolist() == [0.05] * 5  # no online export series: the tariff's
    # An hourly series seen from 15-minute steps: each step takes its hour's price.
    f.set_online("export_price", _series(T0, [0.01, 0.02], step_s=3600))
    assert (
        f.forecast(T0 + 1800, 900, 8).export_price.tolist() == [0.01] * 2 + [0.02] * 4 + [0.05] * 2
    )


def test_an_expired_or_ended_series_falls_back_and_an_override_still_wins() -> None:
    f = Forecaster(ForecastConfig(), TARIFF, "Europe/Stockholm")
    f.set_online("import_price", _series(T0, [0.1] * 8, expires_at=T0 + 3600))
    assert f.forecast(T0 + 1800, 900, 2).import_price.tolist() == [0.1, 0.1]
    assert f.forecast(T0 + 3600, 900, 2).import_price.tolist() == [0.30, 0.30]  # expired
    f.set_online("import_price", _series(T0, [0.1] * 4))
    assert f.forecast(T0 + 7200, 900, 2).import_price.tolist() == [0.30, 0.30]  # ended
    f.set_online("import_price", _series(T0, [0.1] * 8))
    f.set_override("import_price", Override(T0, 900, (0.9,)))  # the operator's word wins
    assert f.forecast(T0, 900, 3).import_price.tolist() == [0.9, 0.1, 0.1]
    f.set_online("import_price", None)
    assert f.forecast(T0 + 900, 900, 2).import_price.tolist() == [0.30, 0.30]
    with pytest.raises(ValueError, match="quantity: 'load_w' has no online source"):
        f.set_online("load_w", _series(T0, [1.0]))


def test_online_pv_is_used_only_where_load_is_forecast_apart_from_pv() -> None:
    f = Forecaster(ForecastConfig(load="persistence", pv="persistence"), TARIFF, "Europe/Stockholm")
    f.set_online("pv_w", _series(T0, [1500.0, 2500.0]))
    f.observe(T0 - 900, 800.0)  # net load only: the learned load has the PV in it already
    assert f.forecast(T0, 900, 3).pv_w.tolist() == [0.0, 0.0, 0.0]
    f.observe(T0, 300.0, pv_w=1000.0)  # now PV is measured and load is learned apart
    fc = f.forecast(T0, 900, 3)
    assert fc.pv_w.tolist() == [1500.0, 2500.0, 1000.0]  # the built-in persistence after it
    assert fc.load_w.tolist() == [1300.0] * 3


# -- configuration ------------------------------------------------------------------------

SITE = """
[site]
id = "home-1"
timezone = "Europe/Stockholm"
grid_import_limit_w = 9000
grid_export_limit_w = 5000

[tariff]
currency = "{currency}"
import_price_per_kwh = 0.25
"""


def _problems(tmp_path: Path, extra: str, currency: str = "EUR") -> list[str]:
    path = tmp_path / "essd.toml"
    path.write_text(SITE.format(currency=currency) + textwrap.dedent(extra))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_online_sources_are_off_by_default(tmp_path: Path) -> None:
    path = tmp_path / "essd.toml"
    path.write_text(SITE.format(currency="EUR"))
    settings = load_settings(path)
    assert not settings.forecast.online.prices.enabled
    assert not settings.forecast.online.pv.enabled
    assert sources_for(settings) == []
    assert sources_for(load_settings(EXAMPLE)) == []


@pytest.mark.parametrize(
    ("extra", "currency", "field"),
    [
        ("[forecast.online.prices]\nenabled = true\narea = 'XX9'\n", "EUR", "area"),
        ("[forecast.online.prices]\nenabled = true\nrefresh_s = 5\n", "EUR", "refresh_s"),
        ("[forecast.online.prices]\nenabled = true\ntimeout_s = 0\n", "EUR", "timeout_s"),
        ("[forecast.online.prices]\nenabled = true\n", "CNY", "forecast.online.prices"),
        ("[forecast.online.prices]\nsource = 'entsoe'\n", "EUR", "source"),
        ("[forecast.online.pv]\nenabled = true\n", "EUR", "online.pv"),
        (
            "[forecast.pv_array]\nlatitude = 59.3\nlongitude = 18.1\nkwp = 6\n"
            "[forecast.online.pv]\nenabled = true\nstep_s = 700\n",
            "EUR",
            "step_s",
        ),
    ],
    ids=["area", "refresh", "timeout", "currency", "source", "pv-without-array", "pv-step"],
)
def test_bad_online_config_is_refused_naming_the_field(
    tmp_path: Path, extra: str, currency: str, field: str
) -> None:
    problems = _problems(tmp_path, extra, currency)
    assert any(field in p for p in problems), problems


async def test_an_unreadable_api_key_file_stops_the_start_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "essd.toml"
    path.write_text(
        SITE.format(currency="EUR")
        + "[forecast.pv_array]\nlatitude = 59.3\nlongitude = 18.1\nkwp = 6\n"
        + f"[forecast.online.pv]\nenabled = true\napi_key_file = '{tmp_path / 'no.key'}'\n"
    )
    daemon = Daemon(settings=load_settings(path), clock=SimClock(T0), serve_metrics=False)
    with pytest.raises(ConfigError) as info:
        await daemon.run(duration_s=60.0)
    assert info.value.problems[0].startswith("forecast.online.pv.api_key_file: cannot read")
    assert daemon.controller is None  # refused before any device was built


def test_the_config_knows_the_pinned_librarys_areas_and_currencies() -> None:
    assert set(NORDPOOL_AREAS) == set(pynordpool.AREAS)
    assert set(NORDPOOL_CURRENCIES) == {c.value for c in pynordpool.Currency}


def test_a_site_with_both_sources_gets_both(tmp_path: Path) -> None:
    path = tmp_path / "essd.toml"
    path.write_text(
        SITE.format(currency="SEK")
        + "[forecast.pv_array]\nlatitude = 59.3\nlongitude = 18.1\nkwp = 6\n"
        + "[forecast.online.prices]\nenabled = true\narea = 'SE3'\n"
        + "[forecast.online.pv]\nenabled = true\n"
    )
    sources = sources_for(load_settings(path), {})
    assert [s.name for s in sources] == ["nordpool", "forecast.solar"]


# -- the background refresh ---------------------------------------------------------------


class ScriptedSource:
    """A source whose fetches fail or succeed as scripted; records when it was asked."""

    name = "scripted"

    def __init__(self, outcomes: list[BaseException | None], **cfg: Any) -> None:
        self.config = OnlinePricesConfig(enabled=True, **cfg)
        self.outcomes = outcomes
        self.asked: list[float] = []
        self.clock: SimClock | None = None

    async def fetch(self, session: Any, now: float) -> dict[str, OnlineSeries]:
        assert self.clock is not None
        self.asked.append(self.clock.monotonic())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        return {"import_price": _series(now, [0.2] * 96, fetched_at=now)}


class _NoSession:
    async def close(self) -> None:
        return None


async def _cycles(online: OnlineForecasts, clock: SimClock, n: int, period_s: float) -> None:
    for _ in range(n):
        online.poll()
        await online.settle()
        clock.advance(period_s)


async def test_failures_back_off_doubling_up_to_the_refresh_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SimClock(T0)
    error = OnlineDataError("scripted", "currency", "got 'SEK', the tariff is in EUR")
    source = ScriptedSource(
        [error, error, error, error, error, ConnectionError("refused"), None],
        retry_s=60.0,
        refresh_s=600.0,
    )
    source.clock = clock
    got: list[tuple[str, OnlineSeries]] = []
    online = OnlineForecasts(
        [source],
        lambda q, s: got.append((q, s)),
        clock=clock,
        session_factory=lambda _t: _NoSession(),  # type: ignore[arg-type,return-value]
    )
    with caplog.at_level(logging.INFO, logger="essd.online.runner"):
        await _cycles(online, clock, 300, 10.0)  # 3000 s of 10-second cycles
    # 60, 120, 240, 480, then capped at the refresh interval (600), then refreshed every 600.
    assert source.asked == [0.0, 60.0, 180.0, 420.0, 900.0, 1500.0, 2100.0, 2700.0]
    status = online.status["scripted"]
    assert status.failures == 0
    assert status.last_success == T0 + 2700.0
    assert status.covers_until == T0 + 2700.0 + 96 * 900.0
    assert [q for q, _ in got] == ["import_price", "import_price"]  # 2100 s and 2700 s
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # Logged when the failure starts and when its cause changes, not at every retry.
    assert len(errors) == 2, errors
    assert "scripted: currency: got 'SEK'" in errors[0]
    assert "scripted: ConnectionError: refused" in errors[1]
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert recovered == ["online forecast scripted recovered after 6 failed fetches"]


def _gauges(exporter: MetricsExporter) -> dict[str, float]:
    text = exporter.exposition().decode()
    return {
        f"{s.name}:{s.labels.get('source', '')}": s.value
        for fam in text_string_to_metric_families(text)
        if fam.name.startswith("essd_online_forecast")
        for s in fam.samples
    }


async def test_freshness_is_exported_as_gauges_on_the_daemons_clock() -> None:
    clock = SimClock(T0)
    bus = EventBus()
    exporter = MetricsExporter(clock=clock, process_metrics=False)
    exporter.attach(bus)
    error = OnlineDataError("scripted", "multiAreaEntries", "stale: every period is in the past")
    source = ScriptedSource([None, error, error], retry_s=60.0, refresh_s=600.0)
    source.clock = clock
    online = OnlineForecasts(
        [source],
        lambda q, s: None,
        clock=clock,
        session_factory=lambda _t: _NoSession(),  # type: ignore[arg-type,return-value]
        bus=bus,
    )
    assert _gauges(exporter) == {}  # nothing before the first fetch
    await _cycles(online, clock, 1, 10.0)
    assert _gauges(exporter) == {
        "essd_online_forecast_failures:scripted": 0.0,
        "essd_online_forecast_age_seconds:scripted": 10.0,
        "essd_online_forecast_ahead_seconds:scripted": 96 * 900.0 - 10.0,
    }
    await _cycles(online, clock, 69, 10.0)  # fetched at 600 (fails) and 660 (fails)
    assert _gauges(exporter) == {
        "essd_online_forecast_failures:scripted": 2.0,
        "essd_online_forecast_age_seconds:scripted": 700.0,
        "essd_online_forecast_ahead_seconds:scripted": 96 * 900.0 - 700.0,
    }


async def test_a_fetch_that_hangs_times_out_and_is_retried() -> None:
    clock = SimClock(T0)

    class Hanging(ScriptedSource):
        async def fetch(self, session: Any, now: float) -> dict[str, OnlineSeries]:
            self.asked.append(clock.monotonic())
            await asyncio.Event().wait()  # never answers
            raise AssertionError

    source = Hanging([], timeout_s=0.05, retry_s=30.0)
    online = OnlineForecasts(
        [source],
        lambda q, s: None,
        clock=clock,
        session_factory=lambda _t: _NoSession(),  # type: ignore[arg-type,return-value]
    )
    await _cycles(online, clock, 7, 10.0)
    assert source.asked == [0.0, 30.0, 60.0 + 30.0][:2]  # 30, then 60 later (at 90)
    assert online.status["scripted"].last_error == "scripted: no answer in time"
    await online.aclose()


# -- control cycles with the real library against the local server -----------------------

# 08:00 CET on the recorded delivery day (15:00 in Chongqing, where the example site is).
START = datetime(2026, 3, 10, 7, 0, tzinfo=UTC).timestamp()


def _example_with_prices() -> Settings:
    """The example site with Nord Pool prices (SE3, EUR) fetched online."""
    settings = load_settings(EXAMPLE)
    online = settings.forecast.online.model_copy(
        update={"prices": OnlinePricesConfig(enabled=True, area="SE3", retry_s=30.0)}
    )
    return settings.model_copy(
        update={
            "tariff": settings.tariff.model_copy(update={"currency": "EUR"}),
            "forecast": settings.forecast.model_copy(update={"online": online}),
            "metrics": settings.metrics.model_copy(update={"enabled": False}),
        }
    )


@asynccontextmanager
async def _priced_site(clock: SimClock) -> AsyncIterator[tuple[FakeApis, SimulatedSite]]:
    """The local portal APIs, and the example site with online prices simulated on ``clock``."""
    async with (
        serve_apis() as apis,
        SimulatedSite(_example_with_prices(), clock=clock, free_ports=True) as sim,
    ):
        yield apis, sim


async def test_cycles_plan_on_fetched_prices_and_run_on_through_a_bad_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    day = recorded("nordpool_dayahead_2026-03-10_SE3_EUR.json")
    entries = day["multiAreaEntries"]
    first = datetime.fromisoformat(entries[0]["deliveryStart"].replace("Z", "+00:00")).timestamp()
    clock = SimClock(START)
    bus = EventBus()
    events = cycles_of(bus)
    async with _priced_site(clock) as (apis, sim):
        broken = {"on": True}
        apis.nordpool_days["2026-03-10"] = day
        # First the portal answers with NaN prices (a response the library takes as it is;
        # pynordpool retries an unreadable one itself, 7 s apart, which is no test to wait for).
        bad = copy.deepcopy(day)
        bad["multiAreaEntries"][40]["entryPerArea"]["SE3"] = math.nan
        apis.hook = lambda r: web.json_response(bad) if broken["on"] else None
        pool = EndpointPool(clock=clock)
        ctl = build_controller(sim.settings, clock=clock, bus=bus, pool=pool)
        online = OnlineForecasts(
            sources_for(sim.settings),
            ctl.forecaster.set_online,
            clock=clock,
            session_factory=apis.session,
        )
        try:
            with caplog.at_level(logging.ERROR, logger="essd.online.runner"):
                for k in range(14):  # 140 simulated seconds of 10-second cycles
                    if k == 6:
                        broken["on"] = False
                    await ctl.run_cycle()
                    online.poll()
                    await online.settle()
                    clock.advance(10.0)
        finally:
            await online.aclose()
            await pool.close()
    assert len(events) == 14  # every cycle completed
    assert all(
        e.plan.cause not in (PlanCause.FORECAST_FAILED, PlanCause.FORECAST_INVALID) for e in events
    )
    # Fetched after cycles 0, 3 (retry after 30 s: still bad) and 9 (60 s later: good); until
    # then the tariff (0.64 at 15:00 in Chongqing) priced the plans.
    assert [e.import_price for e in events[:10]] == [0.64] * 10
    errors = [r.getMessage() for r in caplog.records if r.name == "essd.online.runner"]
    assert len(errors) == 1, errors
    assert "nordpool: multiAreaEntries.40.entryPerArea.SE3: expected a finite price" in errors[0]
    # Once it answered, the day-ahead price of each cycle's quarter hour priced it.
    for e in events[10:]:
        k = int((e.time - first) // 900)
        assert e.import_price == pytest.approx(entries[k]["entryPerArea"]["SE3"] / 1000.0)
    assert online.status["nordpool"].covers_until == first + 96 * 900.0
    assert len([p for p, _ in apis.requests if p == "/api/DayAheadPrices"]) == 3 * 2  # 2 days


async def test_a_refused_connection_is_a_logged_failure_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SimClock(START)
    async with serve_apis() as apis:
        pass  # the server is gone: its port refuses connections
    settings = _example_with_prices()
    online = OnlineForecasts(
        sources_for(settings), lambda q, s: None, clock=clock, session_factory=apis.session
    )
    with caplog.at_level(logging.ERROR, logger="essd.online.runner"):
        await _cycles(online, clock, 4, 10.0)
    await online.aclose()
    status = online.status["nordpool"]
    assert status.failures == 2  # at 0 s and, retried, at 30 s
    assert status.last_success is None
    assert "ClientConnectorError" in (status.last_error or "")
    assert len(caplog.records) == 1


async def test_the_daemon_fetches_in_the_background_and_stops_cleanly() -> None:
    clock = SimClock(START)
    async with _priced_site(clock) as (apis, sim):
        apis.nordpool_days["2026-03-10"] = recorded("nordpool_dayahead_2026-03-10_SE3_EUR.json")
        daemon = Daemon(
            settings=sim.settings, clock=clock, serve_metrics=False, online_sessions=apis.session
        )
        seen: list[float] = []

        def until_online(event: Event) -> None:
            if isinstance(event, CycleCompleted):
                seen.append(event.import_price)
                if event.import_price != 0.64:  # a day-ahead price: enough
                    daemon.request_stop()

        daemon.bus.subscribe(until_online)
        code = await daemon.run(duration_s=86_400.0)
    assert code == 0
    assert daemon.online is not None
    assert daemon.online.status["nordpool"].last_success is not None
    assert seen[0] == 0.64  # the first cycle ran before any fetch
    assert seen[-1] != 0.64
    assert any(path == "/api/DayAheadPrices" for path, _ in apis.requests)
