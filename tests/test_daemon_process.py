"""`essd run` as systemd runs it: READY before WATCHDOG, pings at half WATCHDOG_USEC, and on
SIGTERM: STOPPING, safe mode written to every device, exit 0."""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import sys
import time
from pathlib import Path

from essd.clock import RealClock
from essd.config_loading import load_settings
from hil_sim.devices import StorageDevice
from hil_sim.runner import SimulatedSite
from tests.support.site import EXAMPLE, write_config
from tests.support.systemd import NotifyListener, service_invocation

WATCHDOG_S = 2.0  # WATCHDOG_USEC as a unit with WatchdogSec=2 would set it: pings every 1 s


async def test_run_notifies_ready_then_watchdog_and_stops_safely(tmp_path: Path) -> None:
    settings = load_settings(EXAMPLE)
    async with SimulatedSite(settings, clock=RealClock(), free_ports=True) as sim:
        config = write_config(
            sim.settings,
            tmp_path / "essd.toml",
            control={"cycle_period_s": 1.0, "setpoint_ttl_s": 30.0, "solve_budget_s": 0.5},
            metrics={"enabled": False},
        )
        with NotifyListener(tmp_path) as listener:
            cmd, env = service_invocation(
                [sys.executable, "-m", "essd", "run", "--config", str(config)],
                listener,
                watchdog_s=WATCHDOG_S,
            )
            proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            try:
                ready = await asyncio.to_thread(listener.wait_for, "READY", 60.0)
                assert ready.fields["READY"] == "1"
                assert "cycle" in ready.fields.get("STATUS", "")
                assert not any("WATCHDOG" in n.fields for n in listener.received[:-1])

                # Watch the pings for a while: they come at half of WATCHDOG_USEC.
                pings: list[float] = []
                deadline = time.monotonic() + 5.5
                while time.monotonic() < deadline:
                    note = await asyncio.to_thread(listener.receive, deadline - time.monotonic())
                    if note is not None and note.fields.get("WATCHDOG") == "1":
                        pings.append(note.at)
                assert len(pings) >= 4
                gaps = [b - a for a, b in itertools.pairwise(pings)]
                assert 0.8 <= statistics.median(gaps) <= 1.3

                # The cycle has been commanding the devices: the PCS setpoint function is on.
                assert sim.devices["pcs1"].value("wset_enable") in ("ENABLED", 1)
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                stopping = await asyncio.to_thread(listener.wait_for, "STOPPING", 10.0)
                code = await asyncio.wait_for(proc.wait(), 15.0)
                elapsed = time.monotonic() - sent
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            output = (await proc.stdout.read()).decode() if proc.stdout else ""
            assert code == 0, output
            assert stopping.at - sent < 5.0
            assert elapsed < 10.0

        # Safe mode as each profile defines it reached every storage unit.
        pcs = sim.devices["pcs1"]
        assert pcs.value("wset_enable") in ("DISABLED", 0)
        assert pcs.value("wset_w") == 0
        assert sim.devices["home-a"].value("forcible_charge_discharge") == 0
        for dev in sim.devices.values():
            if isinstance(dev, StorageDevice):
                assert dev.commanded_power() == 0.0, dev.device_id
