"""Built-in forecasters (essd.forecasters): week profile, clear-sky PV, weekend/holiday tariff."""

from __future__ import annotations

import json
from datetime import date, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from essd.config import PvArrayConfig, TariffConfig
from essd.forecast import tariff_import_price
from essd.forecasters import ClearSkyPV, WeekProfile

TZ = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2025, 5, 5, tzinfo=TZ).timestamp()
DAY = 86_400.0
STEP = 900.0


def _weekday_load(t: float) -> float:
    d = datetime.fromtimestamp(t, tz=TZ)
    return 2000.0 if 8 <= d.hour < 18 else 500.0


def _weekend_load(t: float) -> float:
    return 800.0


def _truth(t: float) -> float:
    d = datetime.fromtimestamp(t, tz=TZ)
    return _weekend_load(t) if d.weekday() >= 5 else _weekday_load(t)


def test_week_profile_learns_weekdays_and_weekends_apart() -> None:
    wp = WeekProfile(TZ)
    for k in range(int(14 * DAY / STEP)):
        t = MONDAY + k * STEP
        wp.observe(t + STEP / 2, _truth(t))
    # Next Monday 10:00 and next Saturday 10:00, a day or more ahead (the carry has decayed).
    monday = MONDAY + 14 * DAY + 10 * 3600
    saturday = MONDAY + 19 * DAY + 10 * 3600
    pred = wp.predict(np.array([monday, saturday]))
    assert pred[0] == pytest.approx(2000.0, rel=0.02)
    assert pred[1] == pytest.approx(800.0, rel=0.02)


def test_week_profile_is_robust_to_an_outlier() -> None:
    wp = WeekProfile(TZ)
    for k in range(int(14 * DAY / STEP)):
        t = MONDAY + k * STEP
        wp.observe(t + STEP / 2, _truth(t))
    glitch = MONDAY + 14 * DAY + 3 * 3600
    wp.observe(glitch + STEP / 2, 50_000.0)  # one absurd reading at 03:00 on a Monday
    for k in range(1, int(DAY / STEP)):
        t = glitch + k * STEP
        wp.observe(t + STEP / 2, _truth(t))
    next_monday_3am = MONDAY + 21 * DAY + 3 * 3600
    # A plain EWMA (alpha 0.25) would still sit near 500 + 0.25 * 49 500 = 12 875 W here.
    assert wp.predict(np.array([next_monday_3am]))[0] < 1000.0


def test_week_profile_holidays_are_forecast_as_weekends() -> None:
    holiday = date(2025, 5, 29)  # a Thursday
    wp = WeekProfile(TZ, holidays={holiday})
    for k in range(int(14 * DAY / STEP)):
        t = MONDAY + k * STEP
        wp.observe(t + STEP / 2, _truth(t))
    at = datetime(2025, 5, 29, 10, tzinfo=TZ).timestamp()
    assert wp.predict(np.array([at]))[0] == pytest.approx(800.0, rel=0.02)


def test_week_profile_state_round_trips_and_refuses_foreign_data() -> None:
    wp = WeekProfile(TZ)
    for k in range(200):
        wp.observe(MONDAY + k * STEP, 1000.0 + k)
    data = json.loads(json.dumps(wp.state()))
    fresh = WeekProfile(TZ)
    fresh.restore(data)
    times = MONDAY + np.arange(96) * STEP
    np.testing.assert_allclose(fresh.predict(times), wp.predict(times))
    with pytest.raises(ValueError, match="mean"):
        fresh.restore({**data, "mean": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"residual\.c0"):
        fresh.restore({**data, "residual": {**data["residual"], "c0": "x"}})


ARRAY = PvArrayConfig(latitude=52.4, longitude=13.06, tilt_deg=35.0, azimuth_deg=180.0, kwp=8.0)


def test_clear_sky_pv_is_zero_at_night_and_peaks_near_noon() -> None:
    pv = ClearSkyPV(ARRAY, TZ)
    day = MONDAY + np.arange(96) * STEP
    cs = pv.clear_sky_w(day)
    assert cs[:12].max() == 0.0  # 00:00-03:00 in May near Berlin
    noon = int(np.argmax(cs))
    assert 11 * 4 <= noon <= 14 * 4  # solar noon is about 13:10 summer time there
    assert 5500.0 < cs.max() < 8000.0  # 8 kWp x ~0.9-1 kW/m2 x losses 0.86


def test_clear_sky_pv_learns_the_clearness_and_decays_to_the_seasonal_mean() -> None:
    pv = ClearSkyPV(ARRAY, TZ, prior_clearness=0.6)
    for d in range(10):  # ten days at 80 % of clear sky
        times = MONDAY + d * DAY + np.arange(96) * STEP
        for t, cs in zip(times, pv.clear_sky_w(times), strict=True):
            pv.observe(float(t), 0.8 * float(cs))
    assert pv.seasonal == pytest.approx(0.8, abs=0.03)
    # Then a dark morning: 20 % of clear sky up to 10:00.
    morning = MONDAY + 10 * DAY + np.arange(40) * STEP
    for t, cs in zip(morning, pv.clear_sky_w(morning), strict=True):
        pv.observe(float(t), 0.2 * float(cs))
    ahead = MONDAY + 10 * DAY + np.array([40, 60, 96 + 50]) * STEP
    ratio = pv.predict(ahead) / pv.clear_sky_w(ahead)
    assert ratio[0] < 0.5  # the next step: still dark
    assert ratio[0] < ratio[1] <= pv.seasonal + 1e-9  # recovering towards the mean
    assert ratio[2] == pytest.approx(pv.seasonal, abs=0.01)  # tomorrow: the mean


def test_weekend_and_holiday_time_of_use() -> None:
    tariff = TariffConfig(
        currency="EUR",
        import_tou=[
            {"start": "00:00", "price_per_kwh": 0.2},
            {"start": "08:00", "price_per_kwh": 0.4},
        ],
        import_tou_weekend=[{"start": "00:00", "price_per_kwh": 0.25}],
        holidays=[date(2025, 5, 29)],
    )
    assert tariff_import_price(tariff, datetime(2025, 5, 28, 9, tzinfo=TZ)) == 0.4
    assert tariff_import_price(tariff, datetime(2025, 5, 29, 9, tzinfo=TZ)) == 0.25
    assert tariff_import_price(tariff, datetime(2025, 5, 31, 9, tzinfo=TZ)) == 0.25
    with pytest.raises(ValueError, match="import_tou_weekend"):
        TariffConfig(
            currency="EUR", import_price_per_kwh=0.3, import_tou_weekend=tariff.import_tou_weekend
        )


def test_week_profile_follows_the_present_on_short_cycles() -> None:
    """Observed every 5 minutes (three times a step), the profile still learns how much of
    a deviation lasts into the next step, and the current step's forecast follows it."""
    rng = np.random.default_rng(3)
    wp = WeekProfile(TZ)
    dev = 0.0
    for k in range(int(14 * DAY / STEP)):
        t = MONDAY + k * STEP
        dev = 0.8 * dev + rng.normal(0.0, 150.0)
        for j in range(3):  # the step's average, seen three times within it
            wp.observe(t + (j + 1) * 300.0 - 150.0, _truth(t) + dev)
    now = MONDAY + 14 * DAY + 10 * 3600
    wp.observe(now - 150.0, _truth(now) + 900.0)  # the present runs 900 W above the profile
    ahead = wp.predict(np.array([now, now + STEP, now + 8 * STEP]))
    assert ahead[0] - 2000.0 > 400.0  # most of the deviation is there now
    assert ahead[0] > ahead[1] > ahead[2]  # and fades
    assert ahead[2] == pytest.approx(2000.0, abs=300.0)  # the profile, within its noise


def test_week_profile_learns_as_fast_on_short_cycles_as_on_step_cycles() -> None:
    """Observed every 5 minutes, three observations within a step weigh as much as one."""
    once, thrice = WeekProfile(TZ), WeekProfile(TZ)
    for k in range(int(8 * DAY / 300.0)):
        t = MONDAY + k * 300.0
        value = 1000.0 if t < MONDAY + 7 * DAY else 1200.0  # the load rises on day eight
        thrice.observe(t + 150.0, value)
        if k % 3 == 2:
            once.observe(t + 150.0 - 300.0, value)  # the middle of the step just ended
    at = np.array([MONDAY + 14 * DAY + 10 * 3600])  # the same bin a week later, no carry
    learned_once, learned_thrice = once.predict(at)[0], thrice.predict(at)[0]
    assert 1000.0 < learned_once < 1200.0
    assert learned_thrice == pytest.approx(learned_once, rel=0.01)


def test_the_observed_part_of_a_step_is_the_forecast_for_the_rest_of_it() -> None:
    """A site cycling more often than once a step has seen part of the step it plans: that
    step's forecast is what was seen (a burst included, not damped), the next step's is not."""
    wp = WeekProfile(TZ)
    for k in range(int(14 * DAY / STEP)):
        t = MONDAY + k * STEP
        wp.observe(t + STEP / 2, _truth(t))
    step_start = MONDAY + 14 * DAY + 10 * 3600  # a Monday, 10:00, profile 2000 W
    wp.observe(step_start + 150.0, 4500.0)  # the first 5 minutes: an oven on
    now = step_start + 300.0
    ahead = wp.predict(np.array([now, now + STEP, now + 2 * STEP]))
    assert ahead[0] == pytest.approx(4500.0)  # the rest of this step: as seen
    assert ahead[1] < 2500.0  # the next step: the profile, the burst not carried
    wp.observe(step_start + 450.0, 3500.0)  # the next 5 minutes, lower
    assert wp.predict(np.array([step_start + 600.0]))[0] == pytest.approx(3500.0)
    # At the next step's start the meter has seen only the step that ended.
    assert wp.predict(np.array([step_start + STEP]))[0] < 2500.0


def test_clear_sky_pv_forecasts_the_rest_of_an_observed_step_as_seen() -> None:
    pv = ClearSkyPV(ARRAY, TZ, prior_clearness=0.8)
    step_start = MONDAY + 12 * 3600  # noon
    cs = float(pv.clear_sky_w(np.array([step_start]))[0])
    pv.observe(step_start + 150.0, 0.3 * cs)  # a cloud over the first 5 minutes
    now = step_start + 300.0
    ahead = pv.predict(np.array([now, now + 4 * STEP]))
    assert ahead[0] == pytest.approx(0.3 * cs)
    assert ahead[1] / float(pv.clear_sky_w(np.array([now + 4 * STEP]))[0]) > 0.5
