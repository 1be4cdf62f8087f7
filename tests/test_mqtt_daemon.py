"""The daemon and MQTT together: `essd demo` with `ESSD_MQTT__*` set, against a real mosquitto.

Retained status/state/plan and device states appear; a command changes what the daemon does and
is answered; an invalid one is refused naming the field; the last will says `offline` when the
daemon is SIGKILLed, and a clean stop leaves `offline` too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import Watcher

BASE = "essd/cq-liangjiang-demo"


async def _start_demo(broker: Mosquitto) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "ESSD_MQTT__HOST": broker.host,
        "ESSD_MQTT__PORT": str(broker.port),
        "ESSD_MQTT__ALLOW_ANONYMOUS_CONTROL": "true",  # the test broker has no accounts
    }
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "essd", "demo", "--no-tui", "--speed", "60"),
        *("--metrics-port", "0"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_daemon_publishes_obeys_commands_and_leaves_a_last_will(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        async with Watcher(broker.host, broker.port, [f"{BASE}/#"]) as watch:
            demo = await _start_demo(broker)
            try:
                await watch.wait_for(f"{BASE}/status", lambda m: m.payload == b"online", within=60)
                state = await watch.wait_for(f"{BASE}/state", within=30)
                assert state.json()["schema"] >= 1
                assert state.json()["mode"] == "auto"
                plan = (await watch.wait_for(f"{BASE}/plan", within=30)).json()
                assert plan["schema"] >= 1
                assert plan["fallback_rung"] in range(1, 6)
                assert len(plan["power_w"]["pcs1"]) == plan["horizon_steps"]
                await watch.wait_for(f"{BASE}/device/pcs1/state", within=30)

                # An operator puts the site in standby: acknowledged, and the daemon follows.
                mark = len(watch.messages)
                await watch.publish(f"{BASE}/cmd/mode", '{"mode": "standby"}')
                result = await watch.wait_for(f"{BASE}/cmd/mode/result", after=mark, within=10)
                assert result.json()["ok"] is True
                assert result.retain is False
                await watch.wait_for(
                    f"{BASE}/state", lambda m: m.json()["mode"] == "standby", after=mark, within=10
                )
                # An invalid command is refused naming the field; nothing changes.
                mark = len(watch.messages)
                await watch.publish(f"{BASE}/cmd/reserve", '{"reserve_soc": 2}')
                refused = await watch.wait_for(f"{BASE}/cmd/reserve/result", after=mark)
                assert refused.json()["ok"] is False
                assert refused.json()["error"].startswith("reserve_soc")

                # Killed without a chance to say goodbye: the broker publishes the last will.
                mark = len(watch.messages)
                demo.send_signal(signal.SIGKILL)
                await demo.wait()
                await watch.wait_for(
                    f"{BASE}/status", lambda m: m.payload == b"offline", after=mark, within=10
                )
            finally:
                if demo.returncode is None:
                    demo.kill()
                    await demo.wait()

            # A clean stop publishes `offline` itself (a clean disconnect fires no will).
            demo = await _start_demo(broker)
            try:
                mark = len(watch.messages)
                await watch.wait_for(
                    f"{BASE}/status", lambda m: m.payload == b"online", after=mark, within=60
                )
                mark = len(watch.messages)
                demo.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(demo.wait(), 20) == 0
                await watch.wait_for(
                    f"{BASE}/status", lambda m: m.payload == b"offline", after=mark, within=10
                )
            finally:
                if demo.returncode is None:
                    demo.kill()
                    await demo.wait()
        # What a newcomer sees: the retained status says offline.
        async with Watcher(broker.host, broker.port, [f"{BASE}/status"]) as late:
            retained = await late.wait_for(f"{BASE}/status")
            assert retained.retain
            assert retained.payload == b"offline"
    finally:
        broker.stop()
