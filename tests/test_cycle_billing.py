"""The billing window the accounting keeps: intervals split at clock-aligned windows, and what
the meter measured of the window under way (for the plan's first step)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import numpy as np
import pytest

from essd.cycle.accounting import Accounting, PeakTracker
from essd.domain import Snapshot
from essd.forecast import Forecast

TZ = ZoneInfo("Europe/Berlin")
W0 = 1_749_000_600.0  # a clock-aligned 15-minute window start (2025-06-04 01:30 UTC)
assert W0 % 900.0 == 0.0


def test_the_cycle_at_a_window_start_reports_the_window_before() -> None:
    """5-minute cycles: the interval that ends at 10:45 belongs to 10:30-10:45."""
    peak = PeakTracker(900.0, TZ)
    for k, grid_w in enumerate((90_000.0, 30_000.0, 30_000.0, 10_000.0, 10_000.0, 10_000.0)):
        peak.add(W0 + 300.0 * (k + 1), grid_w, 300.0)
    # The window W0 (90, 30, 30 kW) closed when the next one started: 50 kW, not a mix.
    assert peak.peak_w == pytest.approx(50_000.0)
    # The window under way at its end: 10 kW for the whole window.
    wh, s = peak.so_far(W0 + 1800.0 - 1e-6, None, 0.0)
    assert wh == pytest.approx(10_000.0 * 900.0 / 3600.0)
    assert s == pytest.approx(900.0, abs=1e-5)


def test_an_interval_across_a_window_start_is_split() -> None:
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 600.0, 36_000.0, 600.0)  # W0 .. W0+600 at 36 kW
    peak.add(W0 + 1200.0, 36_000.0, 600.0)  # W0+600 .. W0+1200: 300 s each side
    wh, s = peak.so_far(W0 + 1200.0, None, 0.0)
    assert (wh, s) == (pytest.approx(36_000.0 * 300.0 / 3600.0), pytest.approx(300.0))
    peak.add(W0 + 1800.0, 0.0, 600.0)
    assert peak.peak_w == pytest.approx(36_000.0)


def test_one_cycle_per_window_measures_nothing_of_the_window_under_way() -> None:
    """At a window's start the window under way is empty, pending interval or not: the plan's
    first step is then planned as a whole window, as before."""
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 900.0, 50_000.0, 900.0)
    assert peak.so_far(W0 + 900.0, None, 0.0) == (0.0, 0.0)
    assert peak.so_far(W0 + 900.0, 70_000.0, 900.0) == (0.0, 0.0)


def _at(t: float, mono: float) -> Snapshot:
    return Snapshot(time=t, mono=mono, batteries={}, meter=None)


def test_the_pending_interval_counts_before_it_is_integrated() -> None:
    """The decide phase runs before the cycle's integration: the accounting counts the interval
    since the last cycle at the grid just read."""
    acc = Accounting(900.0, TZ, 0.0)
    fc = Forecast(
        start=W0,
        step_s=900.0,
        load_w=np.zeros(1),
        pv_w=np.zeros(1),
        import_price=np.full(1, 0.2),
        export_price=np.full(1, 0.05),
        carbon_g_per_kwh=np.zeros(1),
    )
    snap = Snapshot(time=W0, mono=100.0, batteries={}, meter=None)
    acc.integrate(W0, 100.0, 20_000.0, snap, fc)  # the first cycle only starts the clock
    assert acc.billed_so_far(_at(W0 + 300.0, 400.0), 60_000.0) == (
        pytest.approx(60_000.0 * 300.0 / 3600.0),
        pytest.approx(300.0),
    )
    acc.integrate(W0 + 300.0, 400.0, 60_000.0, snap, fc)
    wh, s = acc.billed_so_far(_at(W0 + 600.0, 700.0), 0.0)
    assert (wh, s) == (pytest.approx(5_000.0), pytest.approx(600.0))
    # No grid reading: only what was integrated.
    assert acc.billed_so_far(_at(W0 + 600.0, 700.0), None) == (pytest.approx(5_000.0), 300.0)


def test_a_state_without_the_window_seconds_restores() -> None:
    peak = PeakTracker(900.0, TZ)
    peak.add(W0 + 300.0, 12_000.0, 300.0)
    state = peak.state()
    assert state["window_s"] == pytest.approx(300.0)
    old = {k: v for k, v in state.items() if k != "window_s"}
    again = PeakTracker(900.0, TZ)
    again.restore(old)
    assert again.so_far(W0 + 400.0, None, 0.0) == (pytest.approx(1000.0), 0.0)
    with pytest.raises(ValueError, match="window_s"):
        again.restore({**state, "window_s": -1.0})
