"""Durable state across a crash: ``essd run`` killed with SIGKILL mid-month comes back with
its billing-period peak, energy totals, learned load profile, and the operator's mode and
reserve (set over a real mosquitto before the kill). An unusable state file (truncated by a
power cut, or another site's) is set aside with one warning and essd starts fresh.

The daemon runs as a real process sharing the simulator's running clock (60x real time), so
its once-a-minute state saves come every real second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from essd.clock import SimClock
from essd.config_loading import load_settings
from essd.daemon import Daemon
from essd.state import STATE_FILE
from hil_sim.devices import StorageDevice
from hil_sim.runner import SimulatedSite
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import Watcher
from tests.support.site import EXAMPLE, write_config

SPEED = 60.0
# The 15th of January, 10:00 local: half a billing period has passed.
START = datetime(2026, 1, 15, 10, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data = doc.get("data")
    return data if isinstance(data, dict) else None


async def _until_state(path: Path, predicate: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = _read_state(path)
        if data is not None and predicate(data):
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"state file never matched; last: {_read_state(path)}")


def _learned_bins(data: dict[str, Any]) -> int:
    return sum(v is not None for v in data["forecaster"]["load"]["values"])


async def _start(config: Path, anchor: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "essd", "run", "--config", str(config)),
        *("--sim-speed", str(SPEED), "--sim-start", str(START), "--sim-anchor", str(anchor)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_kill_9_mid_month_keeps_peak_totals_profile_mode_and_reserve(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    anchor = time.time()
    clock = SimClock(START, speed=SPEED, anchor_wall=anchor)
    state_dir = tmp_path / "state"
    state_file = state_dir / STATE_FILE
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with SimulatedSite(load_settings(EXAMPLE), clock=clock, free_ports=True) as sim:
            config = write_config(
                sim.settings,
                tmp_path / "essd.toml",
                metrics={"enabled": False},
                state={"directory": str(state_dir)},
                mqtt={
                    "host": broker.host,
                    "port": broker.port,
                    "allow_anonymous_control": True,  # the test broker has no accounts
                    "ha_discovery": False,
                },
            )
            base = f"essd/{sim.settings.site.id}"
            async with Watcher(broker.host, broker.port, [f"{base}/#"]) as watch:
                procs.append(await _start(config, anchor))
                await watch.wait_for(f"{base}/status", lambda m: m.payload == b"online", within=60)
                for topic, payload in (
                    ("reserve", {"reserve_soc": 0.3}),
                    ("mode", {"mode": "standby"}),
                ):
                    mark = len(watch.messages)
                    await watch.publish(f"{base}/cmd/{topic}", json.dumps(payload))
                    reply = await watch.wait_for(
                        f"{base}/cmd/{topic}/result", after=mark, within=10
                    )
                    assert reply.json()["ok"] is True, reply.json()
                # Learned, booked and saved: a peak, totals, some of the day's profile.
                before = await _until_state(
                    state_file,
                    lambda d: (
                        d["mode"] == "standby"
                        and d["reserve_override"] == 0.3
                        and d["peak"]["peak_w"] > 0
                        and d["totals"]["imported_wh"] > 0
                        and _learned_bins(d) >= 2
                    ),
                    timeout_s=60,
                )
                procs[0].send_signal(signal.SIGKILL)
                await procs[0].wait()

                mark = len(watch.messages)
                procs.append(await _start(config, anchor))
                state = await watch.wait_for(
                    f"{base}/state",
                    lambda m: m.json().get("mode") is not None,
                    after=mark,
                    within=60,
                )
                # The first state published after the restart already has the operator's choice.
                assert state.json()["mode"] == "standby"
                assert state.json()["reserve_soc"] == pytest.approx(0.3)
                booked = before["totals"]["imported_wh"]
                after = await _until_state(
                    state_file, lambda d: d["totals"]["imported_wh"] > booked, timeout_s=60
                )
            # Nothing started from zero: the totals, the month's peak and the profile went on.
            assert after["peak"]["period"] == before["peak"]["period"]
            assert after["peak"]["peak_w"] >= before["peak"]["peak_w"]
            for key in ("imported_wh", "co2_kg"):
                assert after["totals"][key] >= before["totals"][key]
            assert _learned_bins(after) >= _learned_bins(before)
            assert (after["mode"], after["reserve_override"]) == ("standby", 0.3)
            # And standby was obeyed from the first cycle: every unit in its safe mode.
            storage = [d for d in sim.devices.values() if isinstance(d, StorageDevice)]
            assert all(abs(d.commanded_power()) < 1.0 for d in storage)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        broker.stop()


@pytest.mark.parametrize(
    "content",
    [
        b'{"schema": 1, "site": "cq-liangjiang-demo", "data": {"totals": {"imported_wh": 12',
        b'{"schema": 1, "site": "another-site", "data": {}}',
        b"\x00\x01\x02 not json at all",
    ],
    ids=["truncated", "another-site", "binary"],
)
async def test_an_unusable_state_file_is_set_aside_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(content)
    clock = SimClock(START)
    async with SimulatedSite(load_settings(EXAMPLE), clock=clock, free_ports=True) as sim:
        settings = sim.settings.model_copy(
            update={
                "state": sim.settings.state.model_copy(update={"directory": state_dir}),
                "metrics": sim.settings.metrics.model_copy(update={"enabled": False}),
            }
        )
        daemon = Daemon(settings=settings, clock=clock, serve_metrics=False)
        with caplog.at_level(logging.WARNING, logger="essd.state"):
            code = await daemon.run(duration_s=600.0)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "essd.state"]
    assert len(warnings) == 1, warnings
    assert "moved aside" in warnings[0]
    aside = list(state_dir.glob(f"{STATE_FILE}.unusable-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content  # kept for inspection
    # A fresh state was written, for this site, with what the run booked.
    saved = json.loads((state_dir / STATE_FILE).read_text())
    assert saved["site"] == settings.site.id
    assert saved["data"]["totals"]["imported_wh"] > 0
    assert daemon.controller is not None
    assert daemon.controller.cycle_no >= 60
