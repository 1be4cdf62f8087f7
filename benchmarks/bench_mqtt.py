"""MQTT bridge figures against a real mosquitto on loopback.

- ``mqtt.bus_publish.*``: what a control cycle pays to hand an event to the bridge
  (``EventBus.publish`` with the bridge subscribed), broker up and broker down.
- ``mqtt.state_latency.p50``: from ``bus.publish`` to a subscriber receiving ``state``.
- ``mqtt.command_roundtrip.p50``: a command sent by a client until its result arrives.
- ``mqtt.resume_after_restart``: broker killed and restarted; time from the restart until a
  fresh subscriber sees the latest retained state again.
- ``mqtt.payload_build.*``: building the JSON of one cycle (state, 96-step plan, 2 devices) in
  the MQTT task, off the control path but on the same event loop.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import Result
from essd.clock import RealClock
from essd.events import EventBus
from essd.mqtt import (
    MqttBridge,
    build_device_payload,
    build_plan_payload,
    build_state_payload,
)
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import T0, RecordingTarget, Watcher, make_cycle, mqtt_config

SITE = "bench"
BASE = f"essd/{SITE}"


def _us(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


async def _measure(broker: Mosquitto) -> list[Result]:
    bus = EventBus()
    events = [make_cycle(k, time=T0 + 10 * k) for k in range(1, 2001)]
    results: list[Result] = []
    cfg = mqtt_config(broker.port, ha_discovery=False, allow_anonymous_control=True)
    async with (
        Watcher(broker.host, broker.port, [f"{BASE}/#"]) as w,
        MqttBridge(cfg, SITE, bus, RecordingTarget(), RealClock()) as bridge,
    ):
        await asyncio.wait_for(bridge.wait_connected(), 5)
        # Hand-off cost with the broker up (the sender runs between publishes).
        up: list[float] = []
        for ev in events[:1000]:
            t0 = time.perf_counter()
            bus.publish(ev)
            up.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
        # End-to-end latency of the state topic, one cycle at a time.
        latency: list[float] = []
        for ev in events[1000:1100]:
            n = len(w.messages)
            t0 = time.perf_counter()
            bus.publish(ev)
            await w.wait_for(f"{BASE}/state", after=n)
            latency.append(time.perf_counter() - t0)
        # Command round trip.
        roundtrip: list[float] = []
        for k in range(100):
            n = len(w.messages)
            t0 = time.perf_counter()
            await w.publish(f"{BASE}/cmd/reserve", f'{{"reserve_soc": {0.1 + k / 1000}}}')
            result = await w.wait_for(f"{BASE}/cmd/reserve/result", after=n)
            roundtrip.append(time.perf_counter() - t0)
            assert result.json()["ok"], result.payload
        # Broker down: the hand-off must stay the same.
        broker.kill()
        down: list[float] = []
        for ev in events[1100:2000]:
            t0 = time.perf_counter()
            bus.publish(ev)
            down.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
        last = events[1999].cycle
        restarted = time.perf_counter()
        broker.start()
        async with Watcher(broker.host, broker.port, [f"{BASE}/state"]) as late:
            await late.wait_for(f"{BASE}/state", lambda m: m.json()["cycle"] == last, within=30)
        resume = time.perf_counter() - restarted
    results += [
        Result("mqtt.bus_publish.broker_up.p50", _us(up, 0.5), "us"),
        Result("mqtt.bus_publish.broker_up.p99", _us(up, 0.99), "us"),
        Result("mqtt.bus_publish.broker_down.p50", _us(down, 0.5), "us"),
        Result("mqtt.bus_publish.broker_down.p99", _us(down, 0.99), "us"),
        Result("mqtt.bus_publish.broker_down.max", max(down) * 1e6, "us"),
        Result("mqtt.state_latency.p50", statistics.median(latency) * 1e3, "ms"),
        Result("mqtt.command_roundtrip.p50", statistics.median(roundtrip) * 1e3, "ms"),
        Result("mqtt.resume_after_restart", resume, "s"),
    ]
    return results


def _payload_build() -> list[Result]:
    ev = make_cycle(1)
    timings: dict[str, list[float]] = {"state": [], "plan": [], "device": []}
    for _ in range(300):
        t0 = time.perf_counter()
        build_state_payload(SITE, ev).to_payload()
        t1 = time.perf_counter()
        build_plan_payload(SITE, ev.plan).to_payload()
        t2 = time.perf_counter()
        build_device_payload(
            SITE, "bess1", time=ev.time, state=ev.device_states["bess1"], reason="", cycle=ev
        ).to_payload()
        t3 = time.perf_counter()
        timings["state"].append(t1 - t0)
        timings["plan"].append(t2 - t1)
        timings["device"].append(t3 - t2)
    return [Result(f"mqtt.payload_build.{k}.p50", _us(v, 0.5), "us") for k, v in timings.items()]


def run() -> list[Result]:
    """Start a private mosquitto, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="essd-bench-mqtt-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            return _payload_build() + asyncio.run(_measure(broker))
        finally:
            broker.stop()
