"""Time and signals: a wall-clock step either way neither stalls control nor adds energy or
moves the billing peak; every catchable fatal signal leads to the safe stop.

The daemon runs in-process on a stepped clock against the household inverter and meter of
``test_cycle`` (served over loopback Modbus; the meter holds 3 kW of import). The signal
test runs ``essd run`` as a real process against hil_sim.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
import time
from pathlib import Path

import pytest

from drivers.profile_loader import resolve_profile
from essd.clock import SimClock
from essd.daemon import Daemon
from essd.events import CycleCompleted, Event, EventBus
from hil_sim.devices import StorageDevice
from hil_sim.modbus_server import ModbusServer
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from tests.support.site import write_config
from tests.test_cycle import START, settings
from tests.test_daemon_kill import START as PEAK_START
from tests.test_daemon_kill import _site as peak_site
from tests.test_daemon_kill import _until

PERIOD = 10.0
GRID_W = 3000.0


@pytest.mark.parametrize("step_s", [-3600.0, 3600.0], ids=["back-1h", "forward-1h"])
async def test_a_wall_clock_step_neither_stalls_control_nor_corrupts_totals(
    step_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    inverter = ProfileImage(resolve_profile("household-hybrid-forcible"))
    meter = ProfileImage(resolve_profile("site-meter"))
    inverter.set_field("soc", 0.5)
    inverter.set_field("power_w", 0.0)
    meter.set_field("grid_power_w", GRID_W)
    clock = SimClock(START)
    bus = EventBus()
    events: list[CycleCompleted] = []

    def on_event(event: Event) -> None:
        if isinstance(event, CycleCompleted):
            events.append(event)
            # A live meter never reads exactly the same twice (nor does a frozen one pass).
            meter.set_field("grid_power_w", GRID_W + 10.0 * (event.cycle % 3))
            if event.cycle in (20, 60):
                clock.step_wall(step_s if event.cycle == 20 else -step_s)

    bus.subscribe(on_event)
    async with ModbusServer.tcp({1: inverter, 2: meter}) as server:
        daemon = Daemon(settings=settings(server.port), clock=clock, bus=bus, serve_metrics=False)
        with caplog.at_level(logging.WARNING, logger="essd.cycle"):
            assert await daemon.run(duration_s=1200.0) == 0
    # Control never stalled: a cycle every period of monotonic time.
    assert len(events) == 121  # at 0 s and every 10 s up to 1,200 s
    monos = [e.snapshot.mono for e in events]
    assert all(b - a == pytest.approx(PERIOD) for a, b in itertools.pairwise(monos))
    # A stepped clock waits for every cycle: none can overrun (before, all of them did).
    assert not any(e.overrun for e in events)
    # Each step detected once, in the cycle after it happened, and logged once.
    steps = {e.cycle: e.wall_step_s for e in events if e.wall_step_s}
    assert steps == {21: pytest.approx(step_s), 61: pytest.approx(-step_s)}
    stepped = [r for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(stepped) == 2
    # Energy and the billing peak integrate monotonic time: 120 intervals of 10 s.
    grid = [e.grid_power_w for e in events]
    assert None not in grid
    booked = sum(g for g in grid[1:] if g is not None) * PERIOD / 3600.0
    assert events[-1].totals.imported_wh == pytest.approx(booked)
    assert daemon.controller is not None
    peak = daemon.controller.durable_state()["peak"]["peak_w"]
    assert peak <= max(g for g in grid if g is not None) + 1e-6


FATAL = [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM]


@pytest.mark.slow
@pytest.mark.parametrize("sig", FATAL, ids=[s.name for s in FATAL])
async def test_every_fatal_signal_takes_the_safe_stop(sig: signal.Signals, tmp_path: Path) -> None:
    anchor = time.time()
    clock = SimClock(PEAK_START, speed=20.0, anchor_wall=anchor)
    # A price spike: every unit discharges at once, so "essd is in control" is unambiguous.
    async with SimulatedSite(peak_site(), clock=clock, free_ports=True) as sim:
        config = write_config(sim.settings, tmp_path / "essd.toml", metrics={"enabled": False})
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "essd", "run", "--config", str(config)),
            *("--sim-speed", "20", "--sim-start", str(PEAK_START), "--sim-anchor", str(anchor)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        storage = [
            d
            for d in sim.devices.values()
            if isinstance(d, StorageDevice)
            and (d.profile.behaviour.setpoint_timeout_s or d.profile.behaviour.heartbeat_timeout_s)
        ]
        try:
            in_control = await _until(
                lambda: all(d.commanded_power() != 0.0 for d in storage), 60.0
            )
            assert in_control, "essd never took control"
            proc.send_signal(sig)
            code = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
        # Not killed by the signal: a safe stop, with a status systemd restarts on.
        assert code == 128 + int(sig), stderr[-2000:]
        assert f"{sig.name}: stopping safely" in stderr
        # Every storage unit was put in its own safe mode on the way out.
        assert all(d.commanded_power() == 0.0 for d in storage), [
            (d.profile.name, d.commanded_power()) for d in storage
        ]
