"""Forecasts: tariff prices, series files, the learned daily profile and external overrides."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from essd.config import ForecastConfig, PvArrayConfig, TariffConfig
from essd.forecast import DailyProfile, Forecaster, ForecastError, Override, SeriesFile
from essd.forecasters import ClearSkyPV, Persistence, WeekProfile

TZ = ZoneInfo("Asia/Shanghai")


def at(hour: int, minute: int = 0, day: int = 1) -> float:
    return datetime(2026, 3, day, hour, minute, tzinfo=TZ).timestamp()


TOU = TariffConfig(
    currency="CNY",
    import_tou=(
        {"start": "00:00", "price_per_kwh": 0.3},
        {"start": "08:00", "price_per_kwh": 0.6},
        {"start": "18:00", "price_per_kwh": 1.1},
    ),
    export_price_per_kwh=0.1,
)


def test_time_of_use_prices_follow_local_time() -> None:
    f = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    fc = f.forecast(at(7, 30), 900, 4)  # 07:30, 07:45, 08:00, 08:15
    assert fc.import_price.tolist() == [0.3, 0.3, 0.6, 0.6]
    assert fc.export_price.tolist() == [0.1] * 4
    assert fc.carbon_g_per_kwh.tolist() == [581.0] * 4


def test_daily_profile_learns_per_time_of_day_and_falls_back_to_persistence() -> None:
    p = DailyProfile(TZ, bin_s=900)
    p.observe(at(12, 0), 1000.0)
    p.observe(at(12, 5), 2000.0)  # same bin: EWMA 1000 + 0.3 * 1000
    p.observe(at(13, 0), 500.0)
    out = p.predict(np.array([at(12, 10, day=2), at(13, 3, day=2), at(3, 0, day=2)]))
    assert out.tolist() == pytest.approx([1300.0, 500.0, 500.0])  # unknown bin: last value
    p.observe(at(14, 0), float("nan"))  # ignored
    assert p.last == 500.0


def test_learned_forecast_is_net_load_with_zero_pv() -> None:
    f = Forecaster(ForecastConfig(load="persistence", pv="persistence"), TOU, "Asia/Shanghai")
    f.observe(at(10), 4200.0)
    fc = f.forecast(at(10), 900, 3)
    assert fc.load_w.tolist() == [4200.0] * 3
    assert fc.pv_w.tolist() == [0.0] * 3


def test_series_file_by_time_of_day(tmp_path: Path) -> None:
    csv = tmp_path / "site.csv"
    csv.write_text(
        "time,load_w,pv_w,import_price,carbon_g_per_kwh\n"
        "2026-01-01T00:00:00+08:00,100,0,0.2,600\n"
        "2026-01-01T12:00:00+08:00,300,900,0.9,500\n"
    )
    cfg = ForecastConfig(load="file", pv="file", series_file=csv)
    fc = Forecaster(cfg, TOU, "Asia/Shanghai").forecast(at(11, 0), 3600, 3)  # 11:00..13:00
    assert fc.load_w.tolist() == [100.0, 300.0, 300.0]
    assert fc.pv_w.tolist() == [0.0, 900.0, 900.0]
    assert fc.import_price.tolist() == [0.2, 0.9, 0.9]  # the file wins over the tariff
    assert fc.export_price.tolist() == [0.1] * 3  # not in the file: the tariff


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("load_w\n1\n", "time: column missing"),
        ("time,load_w,wind_w\n0,1,2\n", "wind_w: unknown column"),
        ("time,load_w\n0,abc\n", "line 2: load_w: not a number"),
        ("time,load_w\n0,1\n0,2\n", "time: must be strictly increasing"),
        ("time,load_w\nyesterday,1\n", "line 2: time: not ISO 8601"),
        ("time,load_w\n0,nan\n", "line 2: load_w: not finite"),
    ],
)
def test_bad_series_file_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(ForecastError) as info:
        SeriesFile(csv, TZ)
    assert str(info.value).startswith(str(csv))
    assert message in str(info.value)


def test_override_wins_while_it_covers_and_then_expires() -> None:
    f = Forecaster(ForecastConfig(load="persistence"), TOU, "Asia/Shanghai")
    f.set_override("import_price", Override(at(7, 30), 900, (2.0, 2.5)))
    fc = f.forecast(at(7, 30), 900, 3)
    assert fc.import_price.tolist() == [2.0, 2.5, 0.6]
    f.forecast(at(7, 59), 900, 3)
    assert "import_price" in f.overrides
    f.forecast(at(8, 0), 900, 3)  # at its end (07:30 + 2 x 15 min): dropped
    assert "import_price" not in f.overrides
    with pytest.raises(ValueError, match="quantity"):
        f.set_override("wind_w", Override(0, 900, (1.0,)))


def test_measured_pv_is_learned_apart_from_load() -> None:
    f = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    # Midday: the meter sees -1,500 W (export) while the units measure 4,000 W of PV.
    f.observe(at(12, 0), -1500.0, 4000.0)
    f.observe(at(0, 0), 800.0, 0.0)
    fc = f.forecast(at(12, 0, day=2), 900, 1)
    assert fc.load_w.tolist() == [2500.0]  # net + PV: what the site consumed
    assert fc.pv_w.tolist() == [4000.0]
    night = f.forecast(at(0, 0, day=2), 900, 1)
    assert (night.load_w.tolist(), night.pv_w.tolist()) == ([800.0], [0.0])


def test_unmeasured_pv_leaves_a_negative_net_load() -> None:
    f = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    f.observe(at(12, 0), -1500.0)
    fc = f.forecast(at(12, 0, day=2), 900, 1)
    assert fc.load_w.tolist() == [-1500.0]  # negative net load is a normal forecast
    assert fc.pv_w.tolist() == [0.0]


def test_learned_state_round_trips_and_bad_state_is_refused_whole() -> None:
    f = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    f.observe(at(12, 0), -1500.0, 4000.0)
    g = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    g.restore(f.state())
    for name in ("load_w", "pv_w"):
        mine = getattr(g.forecast(at(12, 0, day=2), 900, 1), name).tolist()
        assert mine == getattr(f.forecast(at(12, 0, day=2), 900, 1), name).tolist()
    bad = f.state()
    bad["pv"] = {"bin_s": 900.0, "values": [1.0], "last": None}  # wrong length
    h = Forecaster(ForecastConfig(), TOU, "Asia/Shanghai")
    h.observe(at(3, 0), 700.0)
    with pytest.raises(ValueError, match=r"forecaster\.pv: values"):
        h.restore(bad)
    assert h.forecast(at(3, 0, day=2), 900, 1).load_w.tolist() == [700.0]  # unchanged


@pytest.mark.parametrize(
    ("load", "pv", "load_type", "pv_type"),
    [
        ("daily-profile", "daily-profile", DailyProfile, DailyProfile),
        ("week-profile", "persistence", WeekProfile, Persistence),
        ("persistence", "clear-sky", Persistence, ClearSkyPV),
    ],
)
def test_each_configured_forecaster_is_one_behind_the_protocol(
    load: str, pv: str, load_type: type, pv_type: type
) -> None:
    """forecast.load / forecast.pv choose a QuantityForecaster; it is what predicts."""
    array = PvArrayConfig(latitude=29.56, longitude=106.55, kwp=5.0)
    f = Forecaster(ForecastConfig(load=load, pv=pv, pv_array=array), TOU, "Asia/Shanghai")
    for t, net, sun in ((at(11, 0), -900.0, 2500.0), (at(11, 15), -700.0, 2300.0)):
        f.observe(t, net, sun)
    model = f._load_model(load)
    assert isinstance(model, load_type)
    assert isinstance(f._pv_model(pv), pv_type)
    times = np.array([at(11, 30), at(12, 0)])
    fc = f.forecast(float(times[0]), 1800.0, 2)
    np.testing.assert_allclose(fc.load_w, model.predict(times))
    np.testing.assert_allclose(fc.pv_w, np.maximum(f._pv_model(pv).predict(times), 0.0))


def test_persistence_holds_the_latest_observation_kept_once_in_the_state() -> None:
    """Persistence is the daily profile's latest observation (one value in the state, not a
    copy beside it): restored, it is the forecast; a bad one is refused naming the field."""
    f = Forecaster(ForecastConfig(load="persistence", pv="persistence"), TOU, "Asia/Shanghai")
    f.observe(at(9, 0), 800.0, 300.0)  # net 800 W with 300 W of measured PV: load 1,100 W
    state = f.state()
    assert (state["load"]["last"], state["pv"]["last"]) == (1100.0, 300.0)
    assert not {"last_load", "last_pv"} & set(state)
    g = Forecaster(ForecastConfig(load="persistence", pv="persistence"), TOU, "Asia/Shanghai")
    g.restore(state)
    assert g.forecast(at(10, 0), 900, 2).load_w.tolist() == [1100.0, 1100.0]
    assert g.forecast(at(10, 0), 900, 2).pv_w.tolist() == [300.0, 300.0]
    with pytest.raises(ValueError, match=r"forecaster\.pv: last"):
        g.restore({**state, "pv": {**state["pv"], "last": "high"}})
