"""Who may command essd over MQTT, and how much: against a real mosquitto.

Commands over an anonymous connection are refused unless the operator opts in; credentials
enable them. Retained commands, duplicate JSON keys and requests beyond the configured limits
are refused naming the reason. A burst of 5,000 commands gets 5,000 replies (applied or
``dropped``) and a final ``standby`` still wins. Two bridges never share a client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.factory import EndpointPool
from essd.clock import RealClock, SimClock
from essd.command_handling import handle_command
from essd.command_queue import DROPPED_FULL, DROPPED_SUPERSEDED, CommandQueue
from essd.commands import CommandLimits, CommandResult
from essd.config import MqttConfig, Settings
from essd.cycle import Mode
from essd.daemon import build_controller
from essd.events import EventBus
from essd.mqtt import REFUSED_ANONYMOUS, MqttBridge, command_limits, open_bridge
from tests.support.mosquitto import MOSQUITTO_PUB, MOSQUITTO_SUB, Mosquitto
from tests.support.mqtt import T0, RecordingTarget, Watcher, mqtt_config

SITE = "site-s"
BASE = f"essd/{SITE}"
USERS = {"essd": "essd-pw", "operator": "operator-pw"}
ESSD_LOGIN = {"username": "essd", "password": "essd-pw"}
OPERATOR_LOGIN = {"username": "operator", "password": "operator-pw"}


@pytest.fixture
def open_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that lets anyone in (mosquitto's own choice, not essd's)."""
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker with a password file: essd and an operator have accounts."""
    b = Mosquitto(tmp_path, users=USERS)
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def operator(auth_broker: Mosquitto) -> AsyncIterator[Watcher]:
    async with Watcher(auth_broker.host, auth_broker.port, [f"{BASE}/#"], **OPERATOR_LOGIN) as w:
        yield w


async def command(w: Watcher, name: str, payload: dict[str, Any] | str) -> dict[str, Any]:
    """Send one command and return its reply."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    n = len(w.messages)
    await w.publish(f"{BASE}/cmd/{name}", body)
    reply: dict[str, Any] = (await w.wait_for(f"{BASE}/cmd/{name}/result", after=n)).json()
    return reply


# ---------------------------------------------------------------- who may send commands


async def test_anonymous_commands_are_refused_by_default(
    open_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    target = RecordingTarget()
    bridge = MqttBridge(mqtt_config(open_broker.port), SITE, EventBus(), target, RealClock())
    async with Watcher(open_broker.host, open_broker.port, [f"{BASE}/#"]) as w, bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        for name, payload in [
            ("mode", {"mode": "manual", "id": "m1"}),
            ("setpoint", {"device": "bess1", "power_w": 5000, "ttl_s": 86400}),
            ("reserve", {"reserve_soc": 0.0}),
            ("mode", {"mode": "standby"}),  # even the safe one: nobody may steer the site
        ]:
            reply = await command(w, name, payload)
            assert reply["ok"] is False
            assert reply["error"] == REFUSED_ANONYMOUS
        assert reply_id(w, "m1") == "m1"
    assert target.calls == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        warnings.count(
            "mqtt: commands disabled: anonymous connection (set username and password or a TLS "
            "client certificate, or allow_anonymous_control = true)"
        )
        == 1
    )


def reply_id(w: Watcher, wanted: str) -> str | None:
    for m in w.messages:
        if m.topic.endswith("/result") and m.json().get("id") == wanted:
            return str(m.json()["id"])
    return None


async def test_anonymous_commands_are_accepted_when_the_operator_opts_in(
    open_broker: Mosquitto,
) -> None:
    target = RecordingTarget()
    cfg = mqtt_config(open_broker.port, allow_anonymous_control=True)
    bridge = MqttBridge(cfg, SITE, EventBus(), target, RealClock())
    async with Watcher(open_broker.host, open_broker.port, [f"{BASE}/#"]) as w, bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        assert (await command(w, "mode", {"mode": "manual"}))["ok"] is True
    assert target.calls == [("mode", "manual")]


async def test_commands_are_accepted_with_username_and_password(
    auth_broker: Mosquitto, operator: Watcher, caplog: pytest.LogCaptureFixture
) -> None:
    target = RecordingTarget()
    cfg = mqtt_config(auth_broker.port, **ESSD_LOGIN)
    async with MqttBridge(cfg, SITE, EventBus(), target, SimClock(T0)) as bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        assert (await command(operator, "mode", {"mode": "manual"}))["ok"] is True
        assert (await command(operator, "reserve", {"reserve_soc": 0.3}))["ok"] is True
        setpoint = {"device": "bess1", "power_w": -2000, "ttl_s": 600}
        assert (await command(operator, "setpoint", setpoint))["ok"] is True
    assert target.calls == [
        ("mode", "manual"),
        ("reserve", 0.3),
        ("setpoint", ("bess1", -2000.0, T0 + 600)),
    ]
    # Plaintext with a password is allowed but said out loud.
    assert any("tls = false" in r.getMessage() for r in caplog.records)


def test_security_warnings_and_client_certificate_config(tmp_path: Path) -> None:
    anonymous = MqttConfig(host="h")
    assert not anonymous.commands_enabled
    assert anonymous.security_warnings()[0].startswith("mqtt: commands disabled: anonymous")
    opted_in = MqttConfig(host="h", allow_anonymous_control=True)
    assert opted_in.commands_enabled
    assert "anyone who can publish" in opted_in.security_warnings()[0]
    plaintext = MqttConfig(host="h", username="u", password="p")  # type: ignore[arg-type]
    assert plaintext.security_warnings() == [
        "mqtt: tls = false: the password crosses the network in plaintext"
    ]
    cert = MqttConfig(host="h", tls=True, cert_file=tmp_path / "c.pem", key_file=tmp_path / "k")
    assert cert.authenticated
    assert cert.security_warnings() == []
    old = MqttConfig(host="h", tls=True, cert_file="c", key_file="k", protocol="3.1.1")  # type: ignore[arg-type]
    assert "protocol 3.1.1" in old.security_warnings()[0]
    with pytest.raises(ValueError, match="key_file: give both"):
        MqttConfig(host="h", tls=True, cert_file="c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cert_file: only used with tls = true"):
        MqttConfig(host="h", cert_file="c", key_file="k")  # type: ignore[arg-type]


def test_check_config_prints_the_mqtt_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from essd.cli import main  # noqa: PLC0415

    path = tmp_path / "essd.toml"
    path.write_text(
        '[site]\nid = "home-1"\ntimezone = "Europe/Berlin"\n'
        "grid_import_limit_w = 9000\ngrid_export_limit_w = 0\n"
        '[tariff]\ncurrency = "EUR"\nimport_price_per_kwh = 0.3\n'
        '[mqtt]\nhost = "broker.local"\nusername = "essd"\npassword = "pw"\n'
    )
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}: warning: mqtt: tls = false: the password crosses the network" in err


# ---------------------------------------------------------------- what a command may ask


async def test_duplicate_keys_are_refused_naming_the_key(
    auth_broker: Mosquitto, operator: Watcher
) -> None:
    target = RecordingTarget()
    cfg = mqtt_config(auth_broker.port, **ESSD_LOGIN)
    async with MqttBridge(cfg, SITE, EventBus(), target, RealClock()) as bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        reply = await command(operator, "mode", '{"mode": "standby", "mode": "manual"}')
        assert reply == {"ok": False, "error": "mode: duplicate key"}
        reply = await command(operator, "reserve", '{"reserve_soc": 0.5, "id": "a", "id": "b"}')
        assert reply == {"ok": False, "error": "id: duplicate key"}
    assert target.calls == []


LIMIT_CASES = [
    (
        "setpoint",
        {"device": "bess1", "power_w": 2000, "ttl_s": 86_400},
        "ttl_s: longer than the configured maximum 3600 s",
    ),
    (
        "setpoint",
        {"device": "bess1", "power_w": 2000, "expires_at": T0 + 7200},
        "expires_at: longer than the configured maximum 3600 s",
    ),
    (
        "setpoint",
        {"device": "bess1", "power_w": -6000, "ttl_s": 60},
        "power_w: beyond the configured maximum 5000 W",
    ),
    ("reserve", {"reserve_soc": 0.0}, "reserve_soc: below the configured minimum 0.1"),
]


async def test_limits_are_refused_naming_the_field(
    auth_broker: Mosquitto, operator: Watcher
) -> None:
    target = RecordingTarget(mode="manual")
    cfg = mqtt_config(auth_broker.port, max_manual_power_w=5000, **ESSD_LOGIN)
    async with MqttBridge(cfg, SITE, EventBus(), target, SimClock(T0)) as bridge:
        await asyncio.wait_for(bridge.wait_connected(), 5)
        for name, payload, error in LIMIT_CASES:
            assert await command(operator, name, payload) == {"ok": False, "error": error}
        # Within the limits: applied.
        ok = {"device": "bess1", "power_w": -5000, "ttl_s": 3600}
        assert (await command(operator, "setpoint", ok))["ok"] is True
        assert (await command(operator, "reserve", {"reserve_soc": 0.1}))["ok"] is True
    assert target.calls == [("setpoint", ("bess1", -5000.0, T0 + 3600)), ("reserve", 0.1)]


def test_limits_come_from_mqtt_and_the_control_reserve() -> None:
    settings = Settings(
        site={"id": "s", "timezone": "UTC", "grid_import_limit_w": 1, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        control={"reserve_soc": 0.2},
        mqtt={"host": "h"},
    )
    assert settings.mqtt is not None
    limits = command_limits(settings.mqtt, settings.control)
    assert limits == CommandLimits(3600.0, None, 0.2)
    lower = settings.mqtt.model_copy(update={"min_reserve_soc": 0.05})
    assert command_limits(lower, settings.control).min_reserve_soc == 0.05
    # Without limits (the CLI, tests) the schema still caps a setpoint at 24 h.
    result = handle_command(
        "reserve", b'{"reserve_soc": 0.0}', RecordingTarget(), now=T0, limits=limits
    )
    assert result == CommandResult(ok=False, error="reserve_soc: below the configured minimum 0.2")


async def test_the_controller_refuses_a_setpoint_beyond_the_device_limit() -> None:
    settings = Settings(
        site={"id": "s", "timezone": "UTC", "grid_import_limit_w": 9000, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "inv",
                "profile": "household-hybrid-forcible",  # 5000 W each way
                "max_charge_w": 3000,
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1, "unit": 1},
            }
        ],
        metrics={"enabled": False},
    )
    clock = SimClock(T0)
    pool = EndpointPool(clock=clock)
    try:
        controller = build_controller(settings, clock=clock, bus=EventBus(), pool=pool)
        controller.set_mode(Mode.MANUAL)
        with pytest.raises(ValueError, match=r"^power_w: beyond inv's limit 5000 W"):
            controller.set_manual_setpoint("inv", 5001.0, T0 + 60)
        with pytest.raises(ValueError, match=r"^power_w: beyond inv's limit 3000 W"):
            controller.set_manual_setpoint("inv", -3500.0, T0 + 60)
        controller.set_manual_setpoint("inv", -3000.0, T0 + 60)
    finally:
        await pool.close()


# ---------------------------------------------------------------- the command queue


def test_queue_drops_the_oldest_and_answers_it() -> None:
    from essd.command_handling import read_command  # noqa: PLC0415

    queue = CommandQueue(2)
    for k in range(3):
        command = read_command("reserve", f'{{"reserve_soc": 0.{k + 2}, "id": "r{k}"}}'.encode())
        assert queue.put("reserve", command) is (k < 2)
    first = queue.pop()
    assert first is not None
    assert first.command == CommandResult(ok=False, error=DROPPED_FULL, id="r0")
    mode = read_command("mode", b'{"mode": "manual", "id": "m"}')
    queue.put("mode", mode)  # drops r1
    assert queue.supersede(("mode", "setpoint")) == 1
    replies = [queue.pop() for _ in range(len(queue))]
    assert [(p.name, p.command.id) for p in replies if p is not None] == [
        ("reserve", "r1"),
        ("mode", "m"),
        ("reserve", "r2"),
    ]
    assert replies[1] is not None
    assert replies[1].command == CommandResult(ok=False, error=DROPPED_SUPERSEDED, id="m")
    assert queue.pop() is None
    assert queue.dropped_total == 3


class LineReader:
    """Collects the lines a subprocess prints; wakes waiters on each one."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            async with self._changed:
                self.lines.append(line.decode().rstrip("\n"))
                self._changed.notify_all()

    def count(self, prefix: str) -> int:
        """Lines seen so far that start with ``prefix``."""
        return sum(1 for line in self.lines if line.startswith(prefix))

    async def wait_count(self, prefix: str, n: int, *, within: float) -> None:
        """Return once ``n`` lines starting with ``prefix`` were seen."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: self.count(prefix) >= n)

    async def close(self) -> None:
        """Wait for the end of the stream (after the process ended)."""
        await self._task


async def run_ok(*args: str, stdin: bytes | None = None) -> None:
    """Run a command line to completion; it must succeed."""
    pipe = asyncio.subprocess.PIPE if stdin is not None else None
    proc = await asyncio.create_subprocess_exec(*args, stdin=pipe)
    await proc.communicate(stdin)
    assert proc.returncode == 0, args


async def test_a_burst_of_5000_commands_is_answered_in_full_and_a_final_standby_wins(
    tmp_path: Path,
) -> None:
    # mosquitto holds at most 1000 messages (default) for a client that has not read them yet
    # and then drops, after the publisher had its PUBACK; essd cannot see that, so the broker
    # in front of it is configured with room for a burst (docs/mqtt.md says so too).
    broker = Mosquitto(tmp_path, users=USERS, options=["max_queued_messages 10000"])
    broker.start()
    target = RecordingTarget()
    cfg = mqtt_config(broker.port, command_queue_size=50, **ESSD_LOGIN)
    login = ("-h", broker.host, "-p", str(broker.port), "-u", "operator", "-P", "operator-pw",
             "-q", "1")  # fmt: skip
    results = f"{BASE}/cmd/"
    # Replies are read by a separate process, so reading them cannot slow essd down.
    sub = await asyncio.create_subprocess_exec(
        MOSQUITTO_SUB, *login, "-v", "-t", f"{BASE}/cmd/+/result", "-t", f"{BASE}/probe",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert sub.stdout is not None
    out = LineReader(sub.stdout)
    try:
        async with MqttBridge(cfg, SITE, EventBus(), target, RealClock()) as bridge:
            await asyncio.wait_for(bridge.wait_connected(), 5)
            for _ in range(50):  # until the subscriber is surely subscribed
                await run_ok(MOSQUITTO_PUB, *login, "-t", f"{BASE}/probe", "-m", "x")
                with contextlib.suppress(TimeoutError):
                    await out.wait_count(f"{BASE}/probe", 1, within=0.2)
                    break
            # Two publishers at once, as fast as the broker takes them.
            modes = [json.dumps({"mode": ("manual", "auto")[k % 2], "id": f"m{k}"})
                     for k in range(2500)]  # fmt: skip
            reserves = [json.dumps({"reserve_soc": 0.2 + (k % 50) / 100, "id": f"r{k}"})
                        for k in range(2499)]  # fmt: skip
            burst = {"mode": modes, "reserve": reserves}
            await asyncio.gather(
                *(
                    run_ok(MOSQUITTO_PUB, *login, "-t", f"{BASE}/cmd/{name}", "-l",
                           stdin="".join(f"{line}\n" for line in body).encode())
                    for name, body in burst.items()
                )
            )  # fmt: skip
            standby = json.dumps({"mode": "standby", "id": "last"})
            await run_ok(MOSQUITTO_PUB, *login, "-t", f"{BASE}/cmd/mode", "-m", standby)
            await out.wait_count(results, 5000, within=60)
            with contextlib.suppress(TimeoutError):  # a reply too many would show up here
                await out.wait_count(results, 5001, within=0.3)
            stats = bridge.stats
    finally:
        sub.terminate()
        await sub.wait()
        await out.close()
        broker.stop()
    replies = [json.loads(line.split(" ", 1)[1]) for line in out.lines if line.startswith(results)]
    ids = Counter(r["id"] for r in replies)
    expected = {f"m{k}" for k in range(2500)} | {f"r{k}" for k in range(2499)} | {"last"}
    assert set(ids) == expected
    assert set(ids.values()) == {1}  # exactly one reply each
    errors = Counter(r["error"] for r in replies if not r["ok"])
    assert set(errors) <= {DROPPED_FULL, DROPPED_SUPERSEDED}, errors
    assert {r["id"]: r for r in replies}["last"] == {"ok": True, "error": "", "id": "last"}
    assert target.mode == "standby"
    assert [c for c in target.calls if c[0] == "mode"][-1] == ("mode", "standby")
    applied = sum(1 for r in replies if r["ok"])
    assert applied == len(target.calls)
    assert stats.commands_total == 5000
    assert stats.commands_dropped_total == sum(errors.values())
    print(f"\n5000 commands: {applied} applied, {dict(errors)}")


# ---------------------------------------------------------------- client ids


async def test_two_bridges_get_unique_client_ids_and_do_not_flap(open_broker: Mosquitto) -> None:
    cfg = mqtt_config(open_broker.port)
    async with Watcher(open_broker.host, open_broker.port, [f"{BASE}/status"]) as w:
        a = MqttBridge(cfg, SITE, EventBus(), None, RealClock())
        b = MqttBridge(cfg, SITE, EventBus(), None, RealClock())
        assert a.client_id != b.client_id
        assert a.client_id.startswith(f"essd-{SITE}-")
        async with a, b:
            await asyncio.wait_for(a.wait_connected(), 5)
            await asyncio.wait_for(b.wait_connected(), 5)
            await asyncio.sleep(0.5)  # a shared id would have the broker kick one out by now
            assert (a.stats.connects_total, b.stats.connects_total) == (1, 1)
            assert a.connected
            assert b.connected
        assert [m.payload for m in w.on(f"{BASE}/status") if not m.retain][:2] == [
            b"online",
            b"online",
        ]
    fixed = MqttBridge(mqtt_config(1, client_id="gw-7"), SITE, EventBus(), None, RealClock())
    assert fixed.client_id == "gw-7"


async def test_open_bridge_applies_the_control_reserve_floor(
    auth_broker: Mosquitto, operator: Watcher
) -> None:
    settings = Settings(
        site={"id": SITE, "timezone": "UTC", "grid_import_limit_w": 1, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        control={"reserve_soc": 0.25},
        mqtt={"host": auth_broker.host, "port": auth_broker.port, **ESSD_LOGIN},
    )
    target = RecordingTarget()
    async with open_bridge(settings, EventBus(), target, RealClock()) as bridge:
        assert bridge is not None
        await asyncio.wait_for(bridge.wait_connected(), 5)
        reply = await command(operator, "reserve", {"reserve_soc": 0.2})
        assert reply == {"ok": False, "error": "reserve_soc: below the configured minimum 0.25"}
    assert target.calls == []
