"""The simulated site: series, grid balance, violations, whole-site start/stop, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from drivers.api import ActivePowerControl, RevertTimerControl
from drivers.factory import EndpointPool
from drivers.profile_loader import shipped_profiles_dir
from essd.cli import main as essd_main
from essd.clock import SimClock
from essd.daemon import build_controller
from essd.events import EventBus
from essd.series import SeriesError
from hil_sim.cli import main as sim_main
from hil_sim.site import SiteSeries
from tests.support.hil_sim import EXAMPLE_SITE, simulated_example, site_drivers

TZ = ZoneInfo("Asia/Shanghai")
EXAMPLE_CSV = shipped_profiles_dir() / "sites" / "example.csv"


def test_example_series_is_a_plausible_winter_day() -> None:
    s = SiteSeries.load(EXAMPLE_CSV, TZ)
    assert s.daily
    day = 1_767_196_800.0  # 2026-01-01 00:00 Asia/Shanghai
    night, noon, evening = day + 3 * 3600, day + 12.5 * 3600, day + 19.5 * 3600
    assert 15_000 < s.value("load_w", night) < 35_000
    assert s.value("load_w", noon) > s.value("load_w", night) + 20_000
    assert s.value("pv_w", night) == 0.0
    assert 15_000 < s.value("pv_w", noon) < 45_000
    assert s.value("import_price", evening) == pytest.approx(1.05)
    assert s.value("import_price", night) == pytest.approx(0.31)
    assert 500 < s.value("carbon_g_per_kwh", noon) < s.value("carbon_g_per_kwh", evening)
    # A daily profile repeats, and interpolates across midnight.
    assert s.value("load_w", night + 86_400 * 40) == pytest.approx(s.value("load_w", night))
    last, first = s.value("load_w", day - 300), s.value("load_w", day)
    assert min(last, first) <= s.value("load_w", day - 150) <= max(last, first)


def test_bad_series_files_name_file_line_and_column(tmp_path: Path) -> None:
    cases = {
        "time,load_w,wind_w\n0,1,2\n": "wind_w: unknown column",
        "load_w,pv_w\n1,2\n": "time: column missing",
        "time,load_w\n0,1\n60,abc\n": "line 3: load_w: not a number",
        "time,pv_w\n0,-5\n": "line 2: pv_w: must be >= 0",
        "time,load_w\n60,1\n0,1\n": "time: must be strictly increasing",
        "time,load_w\nyesterday,1\n": "line 2: time: not ISO 8601",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"s{i}.csv"
        path.write_text(text)
        with pytest.raises(SeriesError) as err:
            SiteSeries.load(path, TZ)
        assert str(err.value).startswith(f"{path}: ")
        assert message in str(err.value)


async def test_whole_site_starts_and_stops() -> None:
    clock = SimClock(speed=600)
    # A hang guard, not a speed test: bench_hil_sim measures how long this takes.
    async with asyncio.timeout(60):
        async with simulated_example(clock) as sim:
            assert len(sim.endpoints()) == 5
            ep = next(e for e in sim.endpoints() if e.kind == "tcp")
            _, w = await asyncio.open_connection(ep.host, ep.port)
            w.close()
        with pytest.raises(ConnectionRefusedError):  # stopped: the port no longer answers
            await asyncio.open_connection(ep.host, ep.port)


async def test_running_clock_plays_time_at_600x() -> None:
    clock = SimClock(speed=600)
    async with simulated_example(clock) as sim, site_drivers(sim, clock) as drivers:
        drv = drivers["pcs1"]
        assert drv.capability(ActivePowerControl) is not None
        assert drv.capability(RevertTimerControl) is not None
        await drv.configure_revert_timer(3600)
        await drv.set_active_power(100_000.0, duration_s=3600)
        before = sim.truth()
        await asyncio.sleep(0.5)  # five simulated minutes
        after = sim.truth()
        assert after.time - before.time >= 290
        # 100 kW for >= 290 s out of 215 kWh: at least 3.5 % of SoC.
        assert after.batteries["pcs1"].soc < before.batteries["pcs1"].soc - 0.035


async def test_violations_are_recorded_once_when_they_start() -> None:
    clock = SimClock()
    series = SiteSeries.constant(TZ, load_w=10_000.0, pv_w=60_000.0)
    async with simulated_example(clock, series=series) as sim, site_drivers(sim, clock) as drivers:
        # 50 kW of PV surplus at a zero-export site: an export violation.
        truth = sim.truth()
        assert truth.grid_w == pytest.approx(
            -50_000.0 - sum(b.power_w for b in truth.batteries.values())
        )
        kinds = [v.kind for v in truth.violations]
        assert kinds.count("export_limit") == 1
        sim.truth()
        assert [v.kind for v in sim.truth().violations].count("export_limit") == 1
        # A command beyond the unit's live limits is a violation too (the unit never delivers it).
        ep_driver = drivers["home-a"]
        assert ep_driver.capability(ActivePowerControl) is not None
        await ep_driver.set_active_power(-5_000.0, duration_s=600)
        dev = sim.storage("home-a")
        dev.battery.set_power_caps(charge_w=1_000.0)
        truth = sim.truth()
        assert truth.batteries["home-a"].power_w == pytest.approx(-1_000.0)
        assert "charge_limit" in [v.kind for v in truth.violations]


async def test_export_limiter_curtails_pv() -> None:
    clock = SimClock()
    series = SiteSeries.constant(TZ, load_w=10_000.0, pv_w=60_000.0)
    async with simulated_example(clock, series=series, export_limiter=True) as sim:
        truth = sim.truth()
        assert truth.grid_w == pytest.approx(0.0, abs=1e-6)
        assert truth.pv_available_w == 60_000.0
        assert truth.pv_w < 60_000.0
        assert not [v for v in truth.violations if v.kind == "export_limit"]


def test_cli_prints_one_line_per_device_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hil_sim",
            "--site",
            str(EXAMPLE_SITE),
            "--speed",
            "600",
            "--free-ports",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(5)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [line.split()[0] for line in lines] == ["pcs1", "home-a", "home-b", "camp1", "meter"]
    assert lines[0].startswith("pcs1 industrial-sunspec-pcs modbus-tcp://127.0.0.1:")
    assert lines[0].endswith(" unit=1")
    assert lines[2].endswith(" unit=100")
    assert " modbus-rtu-over-tcp://127.0.0.1:" in lines[3]


def test_bad_input_is_rejected_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.toml"
    text = EXAMPLE_SITE.read_text()
    site.write_text(text.replace('id = "pcs1"', 'id = "pcs1"\ncolour = "red"', 1))
    assert sim_main(["--site", str(site)]) == 2
    assert f"{site}: devices.0.colour: unknown key" in capsys.readouterr().err

    site.write_text(text.replace("grid_import_limit_w = 120000", "grid_import_limit_w = -5"))
    assert essd_main(["sim", "--site", str(site)]) == 2
    assert f"{site}: site.grid_import_limit_w:" in capsys.readouterr().err

    site.write_text(text.replace('profile = "site-meter"', 'profile = "no-such-meter"'))
    assert sim_main(["--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{site}: devices:" in err
    assert "'no-such-meter' not found" in err

    # A profile with an unknown field and an out-of-range value, from the site's profile_dirs.
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    meter = (shipped_profiles_dir() / "devices" / "site-meter.yaml").read_text()
    bad = meter.replace("name: site-meter", "name: bad-meter\nwarranty_years: 5")
    bad = bad.replace("  unit: 1\n", "  unit: 300\n", 1)
    (profiles / "bad-meter.yaml").write_text(bad)
    site.write_text(
        f"profile_dirs = [{str(profiles)!r}]\n"
        + text.replace('profile = "site-meter"', 'profile = "bad-meter"')
    )
    assert sim_main(["--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{profiles / 'bad-meter.yaml'}: warranty_years:" in err
    assert f"{profiles / 'bad-meter.yaml'}: transport.unit:" in err

    faults = tmp_path / "faults.yaml"
    faults.write_text(
        "faults:\n  - {kind: delay, device: pcs1, at: 5, duration: 60, delay_s: 99}\n"
    )
    assert sim_main(["--site", str(EXAMPLE_SITE), "--faults", str(faults)]) == 2
    assert f"{faults}: faults.0.delay_s:" in capsys.readouterr().err

    faults.write_text("faults:\n  - {kind: comm_loss, device: pcs9, at: 5, duration: 60}\n")
    assert sim_main(["--site", str(EXAMPLE_SITE), "--faults", str(faults)]) == 2
    assert f"{faults}: faults.0.device: no device 'pcs9'" in capsys.readouterr().err

    series = tmp_path / "series.csv"
    series.write_text("time,load_w\n0,lots\n")
    assert sim_main(["--site", str(EXAMPLE_SITE), "--series", str(series)]) == 2
    assert f"{series}: line 2: load_w: not a number" in capsys.readouterr().err


async def test_daemon_controller_in_the_loop_then_devices_revert_when_it_stops() -> None:
    # 17:30 local: the evening price peak of the example tariff.
    clock = SimClock(datetime(2026, 1, 1, 17, 30, tzinfo=TZ).timestamp())
    async with simulated_example(clock) as sim:
        pool = EndpointPool(clock=clock)
        try:
            controller = build_controller(sim.settings, clock=clock, bus=EventBus(), pool=pool)
            for _ in range(6):
                event = await controller.run_cycle()
                clock.advance(10)
                truth = sim.truth()
                for dev_id, setpoint in event.setpoints.items():
                    # What essd commanded is what flows: the simulated limits were honoured.
                    assert truth.batteries[dev_id].power_w == pytest.approx(
                        setpoint.power_w, abs=50.0
                    )
            assert any(b.power_w > 0 for b in truth.batteries.values())  # discharging at peak
            assert truth.violations == ()
        finally:
            await pool.close()
        # essd stops (crashes): every device is back in its safe mode within its timer.
        clock.advance(65)
        assert all(b.power_w == 0.0 for b in sim.truth().batteries.values())


def test_step_average_series_are_held_not_interpolated() -> None:
    """``hold``: a value is the average over its step; mid-step the plant sees it, not a
    blend with the next one (a HIL scenario's ``series.hold``)."""
    tz = ZoneInfo("Europe/Berlin")
    t0 = datetime(2025, 6, 2, tzinfo=tz).timestamp()
    times = [t0 + k * 900.0 for k in range(200)]  # longer than a day: absolute time
    load = [100.0 * (k % 2) for k in range(200)]  # 0, 100, 0, 100 ...
    held = SiteSeries(times, {"load_w": load}, tz=tz, hold=True)
    blended = SiteSeries(times, {"load_w": load}, tz=tz)
    assert held.value("load_w", t0 + 450.0) == 0.0
    assert held.value("load_w", t0 + 900.0 + 450.0) == 100.0
    assert blended.value("load_w", t0 + 450.0) == pytest.approx(50.0)
    daily = SiteSeries(times[:96], {"load_w": load[:96]}, tz=tz, hold=True)
    # A daily profile wraps: before its first sample the day's last one holds.
    assert daily.value("load_w", t0 + 86_400.0 - 1.0) == 100.0
