"""The MQTT bridge against a real mosquitto: retained topics, last will, commands, Home
Assistant discovery, a broker crash mid-run, authentication and TLS."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from essd.clock import RealClock, SimClock
from essd.commands import COMMANDS
from essd.config_loading import load_settings
from essd.domain import DeviceState
from essd.events import (
    CommandHandled,
    DaemonStatus,
    DaemonStatusChanged,
    DeviceStateChanged,
    Event,
    EventBus,
)
from essd.mqtt import DeviceStatePayload, MqttBridge, PlanPayload, StatePayload, open_bridge
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import T0, RecordingTarget, Watcher, make_cycle, mqtt_config

SITE = "site-a"
BASE = f"essd/{SITE}"
REPO = Path(__file__).parents[1]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def watcher(broker: Mosquitto) -> AsyncIterator[Watcher]:
    topics = [f"{BASE}/#", "essd/site-k/#", "homeassistant/#"]
    async with Watcher(broker.host, broker.port, topics) as w:
        yield w


async def retained(broker: Mosquitto, topic: str, **client: Any) -> Watcher:
    """A fresh subscriber: whatever it receives at once is the broker's retained store."""
    w = Watcher(broker.host, broker.port, [topic], **client)
    await w.__aenter__()
    return w


async def retained_value(broker: Mosquitto, topic: str) -> bytes:
    w = await retained(broker, topic)
    try:
        m = await w.wait_for(topic, lambda m: m.retain)
        return m.payload
    finally:
        await w.__aexit__(None, None, None)


def state_cycle(m: Any) -> int:
    return int(m.json()["cycle"])


async def test_retained_status_state_plan_and_devices_appear(
    broker: Mosquitto, watcher: Watcher
) -> None:
    bus = EventBus()
    async with MqttBridge(mqtt_config(broker.port), SITE, bus, RecordingTarget(), RealClock()):
        bus.publish(make_cycle(1))
        bus.publish(make_cycle(2))  # supersedes cycle 1 if the sender has not run yet
        await watcher.wait_for(f"{BASE}/state", lambda m: state_cycle(m) == 2)
        await watcher.wait_for(f"{BASE}/device/home2/state")
        assert await retained_value(broker, f"{BASE}/status") == b"online"
        state = StatePayload.model_validate_json(await retained_value(broker, f"{BASE}/state"))
        assert (state.schema_version, state.cycle, state.site_id) == (1, 2, SITE)
        plan = PlanPayload.model_validate_json(await retained_value(broker, f"{BASE}/plan"))
        assert plan.horizon_steps == 96
        assert plan.device_ids == ["bess1", "home2"]
        raw = await retained_value(broker, f"{BASE}/device/bess1/state")
        dev = DeviceStatePayload.model_validate_json(raw)
        assert (dev.device_id, dev.state, dev.power_w) == ("bess1", "running", 1500.0)
        # A lifecycle change is published with its reason, before the next cycle.
        bus.publish(DeviceStateChanged("bess1", DeviceState.RUNNING, DeviceState.DEGRADED,
                                       "soc stale for 30 s", T0 + 5))  # fmt: skip
        m = await watcher.wait_for(
            f"{BASE}/device/bess1/state", lambda m: m.json()["state"] == "degraded"
        )
        assert m.json()["reason"] == "soc stale for 30 s"


async def test_clean_stop_leaves_offline(broker: Mosquitto, watcher: Watcher) -> None:
    bus = EventBus()
    bridge = MqttBridge(mqtt_config(broker.port), SITE, bus, None, RealClock())
    async with bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        bus.publish(make_cycle(1))
        await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"online")
    await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"offline")
    assert await retained_value(broker, f"{BASE}/status") == b"offline"
    # The last state stays available to late subscribers.
    assert json.loads(await retained_value(broker, f"{BASE}/state"))["cycle"] == 1


async def test_daemon_stopping_and_cancellation_publish_offline(
    broker: Mosquitto, watcher: Watcher
) -> None:
    bus = EventBus()
    bridge = MqttBridge(mqtt_config(broker.port), SITE, bus, None, RealClock())
    task = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge.wait_connected(), 5)
    bus.publish(DaemonStatusChanged(DaemonStatus.STOPPING, T0))
    first = await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"offline")
    # A cancelled task (a TaskGroup shutting down) still leaves "offline", not a stale "online".
    bus.publish(DaemonStatusChanged(DaemonStatus.ONLINE, T0))
    n = len(watcher.messages)
    await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"online", after=n)
    n = len(watcher.messages)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"offline", after=n)
    assert first.retain is False  # live delivery; the retained copy is checked below
    assert await retained_value(broker, f"{BASE}/status") == b"offline"


async def test_last_will_when_the_daemon_is_killed(broker: Mosquitto, watcher: Watcher) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.mqtt", str(broker.port), "site-k",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"ready\n", (line, await proc.stderr.read() if proc.stderr else b"")
        await watcher.wait_for("essd/site-k/state")  # it really published
        assert await retained_value(broker, "essd/site-k/status") == b"online"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    w = await retained(broker, "essd/site-k/status")
    try:
        m = await w.wait_for("essd/site-k/status", lambda m: m.payload == b"offline", within=10)
    finally:
        await w.__aexit__(None, None, None)
    assert m.retain


COMMAND_EXAMPLES: list[tuple[str, dict[str, Any], list[tuple[str, Any]]]] = [
    ("mode", {"mode": "manual", "id": "c1"}, [("mode", "manual")]),
    ("reserve", {"reserve_soc": 0.3}, [("reserve", 0.3)]),
    (
        "setpoint",
        {"device": "home2", "power_w": 1800, "ttl_s": 120},
        [("setpoint", ("home2", 1800.0, T0 + 120.0))],
    ),
    (
        "prices",
        {"start": T0, "step_s": 900, "import_price": [0.4, 0.9], "export_price": [0.1, 0.2]},
        [
            ("prices", ("import_price", T0, 900.0, (0.4, 0.9))),
            ("prices", ("export_price", T0, 900.0, (0.1, 0.2))),
        ],
    ),
    (
        "forecast",
        {"start": "2026-01-01T00:00:00Z", "step_s": 900, "pv_w": [0, 100]},
        [("forecast", ("pv_w", T0, 900.0, (0.0, 100.0)))],
    ),
]


async def test_each_command_works_and_its_result_arrives(
    broker: Mosquitto, watcher: Watcher
) -> None:
    bus = EventBus()
    handled: list[Event] = []
    bus.subscribe(lambda e: handled.append(e) if isinstance(e, CommandHandled) else None)
    target = RecordingTarget()
    # A simulated clock standing at T0 makes the setpoint's absolute expiry exact.
    cfg = mqtt_config(broker.port, allow_anonymous_control=True)
    bridge = MqttBridge(cfg, SITE, bus, target, SimClock(T0))
    async with bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        for name, payload, expected in COMMAND_EXAMPLES:
            n, calls = len(watcher.messages), len(target.calls)
            await watcher.publish(f"{BASE}/cmd/{name}", json.dumps(payload))
            result = await watcher.wait_for(f"{BASE}/cmd/{name}/result", after=n)
            assert result.json() == (
                {"ok": True, "error": ""} | ({"id": "c1"} if name == "mode" else {})
            )
            assert not result.retain
            assert target.calls[calls:] == expected
        n, calls = len(watcher.messages), len(target.calls)
        await watcher.publish(f"{BASE}/cmd/reserve", '{"reserve_soc": 2}')
        refused = await watcher.wait_for(f"{BASE}/cmd/reserve/result", after=n)
        assert refused.json()["ok"] is False
        assert refused.json()["error"].startswith("reserve_soc: ")
        assert len(target.calls) == calls
    assert [(e.name, e.ok) for e in handled if isinstance(e, CommandHandled)] == [
        *((name, True) for name, _, _ in COMMAND_EXAMPLES),
        ("reserve", False),
    ]
    # Results are never retained: a late subscriber sees none.
    late = await retained(broker, f"{BASE}/cmd/+/result")
    await asyncio.sleep(0.3)
    await late.__aexit__(None, None, None)
    assert late.messages == []


async def test_retained_commands_are_never_applied(broker: Mosquitto, watcher: Watcher) -> None:
    """Neither one waiting on the broker at subscribe time nor one published while online."""
    result = f"{BASE}/cmd/mode/result"
    await watcher.publish(f"{BASE}/cmd/mode", '{"mode": "standby", "id": "old"}', retain=True)
    target = RecordingTarget()
    cfg = mqtt_config(broker.port, allow_anonymous_control=True)
    bridge = MqttBridge(cfg, SITE, EventBus(), target, RealClock())
    async with bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        old = await watcher.wait_for(result, lambda m: m.json().get("id") == "old")
        # Retained while essd is subscribed: MQTT 3.1.1 would deliver it with retain = 0.
        await watcher.publish(f"{BASE}/cmd/mode", '{"mode": "manual", "id": "live"}', retain=True)
        live = await watcher.wait_for(result, lambda m: m.json().get("id") == "live")
        await watcher.publish(f"{BASE}/cmd/mode", '{"mode": "auto", "id": "plain"}')
        plain = await watcher.wait_for(result, lambda m: m.json().get("id") == "plain")
        await watcher.publish(f"{BASE}/cmd/mode", "", retain=True)  # clear the retained one
    for refused in (old, live):
        assert refused.json()["ok"] is False
        assert refused.json()["error"].startswith("retain: ")
    assert plain.json()["ok"] is True
    assert target.calls == [("mode", "auto")]


async def test_home_assistant_discovery_and_birth(broker: Mosquitto, watcher: Watcher) -> None:
    bus = EventBus()
    cfg = mqtt_config(broker.port, ha_discovery=True, allow_anonymous_control=True)
    async with MqttBridge(cfg, SITE, bus, RecordingTarget(), RealClock(), currency="CNY"):
        bus.publish(make_cycle(1))
        topic = "homeassistant/select/essd_site_a/mode/config"
        select = (await watcher.wait_for(topic)).json()
        assert select["availability_topic"] == f"{BASE}/status"
        await watcher.wait_for("homeassistant/sensor/essd_site_a/home2_power/config")
        n = len(watcher.messages)
        await watcher.publish("homeassistant/status", "online")  # HA's birth message
        await watcher.wait_for(topic, after=n)
        # The mode select drives the real command topic through its template.
        n = len(watcher.messages)
        await watcher.publish(select["command_topic"], select["command_template"].replace(
            "{{ value }}", "standby"))  # fmt: skip
        assert (await watcher.wait_for(f"{BASE}/cmd/mode/result", after=n)).json()["ok"]


async def test_discovery_can_be_switched_off(broker: Mosquitto, watcher: Watcher) -> None:
    bus = EventBus()
    cfg = mqtt_config(broker.port, ha_discovery=False)
    async with MqttBridge(cfg, SITE, bus, RecordingTarget(), RealClock()):
        bus.publish(make_cycle(1))
        await watcher.wait_for(f"{BASE}/device/home2/state")
        await watcher.publish("homeassistant/status", "online")
        await asyncio.sleep(0.3)
    assert [m.topic for m in watcher.messages if m.topic.startswith("homeassistant/")] == [
        "homeassistant/status"
    ]


async def test_broker_crash_never_delays_a_cycle_and_publishing_resumes(
    broker: Mosquitto, watcher: Watcher
) -> None:
    bus = EventBus()
    bridge = MqttBridge(mqtt_config(broker.port), SITE, bus, RecordingTarget(), RealClock())
    period = 0.1
    publish_s: dict[str, list[float]] = {"up": [], "down": []}
    taken: list[int] = []
    async with bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        phase = "up"
        for k in range(1, 41):
            await asyncio.sleep(period)
            if k == 10:
                broker.kill()  # a crash: retained store gone, connections dropped
                phase = "down"
            if k == 28:
                broker.start()
                phase = "up"
            event = make_cycle(k, time=T0 + 10 * k)
            before = bridge.stats.events_received_total
            t0 = time.perf_counter()
            bus.publish(event)
            publish_s[phase].append(time.perf_counter() - t0)
            taken.append(bridge.stats.events_received_total - before)
        async with Watcher(broker.host, broker.port, [f"{BASE}/state"]) as first:
            await first.wait_for(f"{BASE}/state", lambda m: state_cycle(m) == 40, within=10)
        # The restarted broker had lost its retained store; the bridge republished it all.
        async with Watcher(broker.host, broker.port, [f"{BASE}/#"]) as late:
            m = await late.wait_for(f"{BASE}/state", lambda m: m.retain)
            assert state_cycle(m) == 40
            await late.wait_for(f"{BASE}/status", lambda m: m.payload == b"online" and m.retain)
            plan = await late.wait_for(f"{BASE}/plan", lambda m: m.retain)
            assert plan.json()["created_at"] == T0 + 400
            await late.wait_for(f"{BASE}/device/bess1/state", lambda m: m.retain)
    assert bridge.stats.connects_total >= 2
    assert bridge.stats.connect_failures_total >= 1
    down = publish_s["down"]
    print(
        f"\nbus.publish during outage: median {statistics.median(down) * 1e6:.1f} us, "
        f"max {max(down) * 1e6:.1f} us over {len(down)} cycles"
    )
    # Publishing hands each event to the bridge synchronously (a memory write; the network is
    # the sender task's business), before, during and after the outage; the timings above are
    # information only (this test never asserts wall time).
    assert len(down) == 18
    assert taken == [1] * 40


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind == 3:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(8)))
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    # Objects with unknown keys: invalid whatever the values are.
    return {f"k{rng.randrange(99)}": _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


async def test_fuzz_sample_over_the_broker(broker: Mosquitto, watcher: Watcher) -> None:
    rng = random.Random(20261122)
    target = RecordingTarget()
    cfg = mqtt_config(broker.port, allow_anonymous_control=True)
    bridge = MqttBridge(cfg, SITE, EventBus(), target, RealClock())
    async with bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        sent = 0
        for name in COMMANDS:
            for _ in range(8):
                await watcher.publish(f"{BASE}/cmd/{name}", rng.randbytes(rng.randrange(64)))
                await watcher.publish(f"{BASE}/cmd/{name}", json.dumps(_random_json(rng)))
                sent += 2
        await watcher.wait_until(
            lambda: len([m for m in watcher.messages if m.topic.endswith("/result")]) >= sent,
            within=10,
        )
        results = [m.json() for m in watcher.messages if m.topic.endswith("/result")]
        assert len(results) == sent
        assert all(r["ok"] is False and ": " in r["error"] for r in results)
        assert target.calls == []
        assert bridge.connected
        n = len(watcher.messages)
        await watcher.publish(f"{BASE}/cmd/mode", '{"mode": "standby"}')
        assert (await watcher.wait_for(f"{BASE}/cmd/mode/result", after=n)).json()["ok"]


async def test_username_password_and_tls(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"essd": "s3cret"}, tls=True)
    broker.start()
    try:
        assert broker.ca_file is not None
        tls = aiomqtt.TLSParameters(ca_certs=str(broker.ca_file))
        auth = {"username": "essd", "password": "s3cret", "tls_params": tls}
        cfg = mqtt_config(broker.port, tls=True, ca_file=broker.ca_file,
                          username="essd", password="s3cret")  # fmt: skip
        bus = EventBus()
        async with (
            Watcher(broker.host, broker.port, [f"{BASE}/#"], **auth) as w,
            MqttBridge(cfg, SITE, bus, None, RealClock()) as bridge,
        ):
            await asyncio.wait_for(bridge.wait_connected(), 5)
            bus.publish(make_cycle(1))
            await w.wait_for(f"{BASE}/state")
        bad = mqtt_config(broker.port, tls=True, ca_file=broker.ca_file,
                          username="essd", password="wrong")  # fmt: skip
        async with MqttBridge(bad, SITE, EventBus(), None, RealClock()) as refused:
            await asyncio.sleep(0.8)
            assert not refused.connected
            assert refused.stats.connect_failures_total >= 2  # it keeps retrying, backing off
    finally:
        broker.stop()


async def test_open_bridge_from_the_environment(
    broker: Mosquitto,
    watcher: Watcher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for key, value in {
        "ESSD_SITE__ID": SITE,
        "ESSD_SITE__GRID_IMPORT_LIMIT_W": "9000",
        "ESSD_SITE__GRID_EXPORT_LIMIT_W": "0",
        "ESSD_SITE__TIMEZONE": "Europe/Berlin",
        "ESSD_TARIFF__CURRENCY": "EUR",
        "ESSD_TARIFF__IMPORT_PRICE_PER_KWH": "0.3",
    }.items():
        monkeypatch.setenv(key, value)
    async with open_bridge(load_settings(None), EventBus(), None, RealClock()) as none:
        assert none is None  # no [mqtt] section: no bridge
    monkeypatch.setenv("ESSD_MQTT__HOST", broker.host)
    monkeypatch.setenv("ESSD_MQTT__PORT", str(broker.port))
    bus = EventBus()
    async with open_bridge(load_settings(None), bus, None, RealClock()) as bridge:
        assert bridge is not None
        bus.publish(make_cycle(5))
        await watcher.wait_for(f"{BASE}/state", lambda m: state_cycle(m) == 5)
        # Stop while the discovery burst is still being sent (this once hung in a lost
        # cancellation inside aiomqtt's publish): the stop is prompt and leaves "offline".
    await watcher.wait_for(f"{BASE}/status", lambda m: m.payload == b"offline")
    # It stopped by itself, not by being cancelled after its stop timeout.
    assert "did not stop" not in caplog.text


async def test_backoff_under_a_stepped_clock_neither_spins_nor_moves_time(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # configured, never started: every connect is refused
    clock = SimClock(T0)
    bridge = MqttBridge(mqtt_config(broker.port), SITE, EventBus(), None, clock)
    async with bridge:
        await asyncio.sleep(0.6)
    # 0.05 s doubling to 0.5 s (jittered down to half): a handful of attempts, not hundreds.
    assert 2 <= bridge.stats.connect_failures_total <= 12
    assert clock.now() == T0  # the back-off did not push simulated time forward
