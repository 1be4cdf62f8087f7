"""A SIGKILLed essd leaves every device safe on its own: revert timers and heartbeats fire in
the simulator within their timeouts. The daemon runs as a real process sharing the simulator's
simulated clock (20x real time), so 60 s device timers take 3 real seconds."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo

from essd.clock import SimClock
from essd.config import Settings, TouWindow
from essd.config_loading import load_settings
from hil_sim.devices import StorageDevice
from hil_sim.runner import SimulatedSite
from tests.support.site import EXAMPLE, write_config

SPEED = 20.0
START = datetime(2026, 1, 1, 11, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()  # peak price


async def _until(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


def _site() -> Settings:
    """The example site with a 15-minute price spike now and export allowed, so that every
    unit discharges at once (an unambiguous optimum: each at its own limit)."""
    base = load_settings(EXAMPLE)
    tariff = base.tariff.model_copy(
        update={
            "import_tou": (
                TouWindow(start=dtime(0, 0), price_per_kwh=0.3),
                TouWindow(start=dtime(11, 0), price_per_kwh=2.0),
                TouWindow(start=dtime(11, 15), price_per_kwh=0.3),
            ),
            "export_price_per_kwh": 1.5,
            "demand_charge_per_kw": 0.0,
        }
    )
    site = base.site.model_copy(update={"grid_export_limit_w": 400_000.0})
    return base.model_copy(update={"tariff": tariff, "site": site})


async def test_sigkilled_daemon_leaves_every_device_reverted_to_safe(tmp_path: Path) -> None:
    anchor = time.time()
    clock = SimClock(START, speed=SPEED, anchor_wall=anchor)
    async with SimulatedSite(_site(), clock=clock, free_ports=True) as sim:
        config = write_config(sim.settings, tmp_path / "essd.toml", metrics={"enabled": False})
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "essd", "run", "--config", str(config)),
            *("--sim-speed", str(SPEED), "--sim-start", str(START), "--sim-anchor", str(anchor)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        storage = {d: dev for d, dev in sim.devices.items() if isinstance(dev, StorageDevice)}
        with_timers = {
            d: dev
            for d, dev in storage.items()
            if dev.profile.behaviour.setpoint_timeout_s or dev.profile.behaviour.heartbeat_timeout_s
        }
        try:
            # Peak price, zero export: essd discharges the units to cover the site's load.
            active = await _until(
                lambda: all(dev.commanded_power() != 0.0 for dev in with_timers.values()), 40.0
            )
            stderr = b""
            if not active:
                proc.kill()
                stderr = await proc.stderr.read() if proc.stderr else b""
            assert active, stderr.decode()[-3000:]
            killed_at = clock.now()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        reverts_before = {d: dev.reverts for d, dev in with_timers.items()}
        longest = max(
            max(
                dev.profile.behaviour.setpoint_timeout_s or 0,
                dev.profile.behaviour.heartbeat_timeout_s or 0,
            )
            for dev in with_timers.values()
        )

        # Every unit with a revert timer or heartbeat goes back to its own safe state by itself.
        def all_reverted() -> bool:
            for dev in with_timers.values():
                dev.true_state()  # the simulator's timers fire as time is observed
            return all(dev.commanded_power() == 0.0 for dev in with_timers.values())

        reverted = await _until(all_reverted, (longest + 30) / SPEED)
        states = {d: (dev.commanded_power(), dev.reverts) for d, dev in with_timers.items()}
        assert reverted, states
        assert clock.now() - killed_at <= longest + 30
        # Each unit was discharging at its limit: its own timer (not essd) brought it back.
        assert all(dev.reverts > reverts_before[d] for d, dev in with_timers.items()), states
        for dev in with_timers.values():
            assert abs(dev.true_state().power_w) < 1.0
        # Nothing the dead daemon left behind broke a limit.
        assert sim.truth().violations == ()
