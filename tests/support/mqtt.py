"""Test support for MQTT: realistic bus events, a recording command target, a broker watcher.

Run as ``python -m tests.support.mqtt PORT SITE_ID`` it is a tiny daemon: a bridge with a real
clock that publishes one cycle, prints ``ready`` once connected and then waits to be killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt

from essd.clock import RealClock
from essd.commands import CommandRejected
from essd.config import MqttConfig
from essd.counters import DeviceCounters
from essd.domain import (
    BatteryReading,
    DeviceClass,
    DeviceState,
    FallbackRung,
    LiveLimits,
    MeterReading,
    Plan,
    PlanCause,
    Reading,
    Setpoint,
    Snapshot,
)
from essd.events import CycleCompleted, EventBus, SiteTotals
from essd.mqtt import MqttBridge

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_cycle(
    cycle: int = 1,
    *,
    time: float = T0,
    devices: Sequence[str] = ("bess1", "home2"),
    soc: Mapping[str, float] | None = None,
    power_w: Mapping[str, float] | None = None,
    grid_power_w: float | None = 1200.0,
    mode: str = "auto",
    reserve_soc: float = 0.1,
    steps: int = 96,
    rung: FallbackRung = FallbackRung.OPTIMAL,
    reason: str = "",
) -> CycleCompleted:
    """A CycleCompleted as the core publishes it: two batteries, a meter, a 96-step plan."""
    soc = soc or {d: 0.4 + 0.1 * i for i, d in enumerate(devices)}
    power_w = power_w or {d: 1500.0 - 2000.0 * i for i, d in enumerate(devices)}
    mono = 100.0 + cycle * 10.0
    batteries = {
        d: BatteryReading(
            device_id=d,
            device_class=DeviceClass.INDUSTRIAL if i == 0 else DeviceClass.HOUSEHOLD,
            read_at_mono=mono,
            available=True,
            soc=Reading.good(soc[d], "ratio", mono),
            power_w=Reading.good(power_w[d], "W", mono),
            limits=LiveLimits(max_charge_w=5000.0, max_discharge_w=6000.0),
            capacity_wh=10_000.0 * (i + 1),
        )
        for i, d in enumerate(devices)
    }
    meter = MeterReading("meter", mono, Reading.good(grid_power_w or 0.0, "W", mono))
    plan = Plan(
        created_at=time,
        step_s=900.0,
        device_ids=tuple(devices),
        power_w={d: tuple(power_w[d] for _ in range(steps)) for d in devices},
        soc={d: tuple(soc[d] for _ in range(steps + 1)) for d in devices},
        grid_w=tuple(grid_power_w or 0.0 for _ in range(steps)),
        objective=12.5,
        solver_status="optimal",
        rung=rung,
        reason=reason,
        cause=PlanCause.OPTIMAL if rung is FallbackRung.OPTIMAL else PlanCause.SOLVER_TIMEOUT,
        solve_s=0.05,
        import_price=tuple(0.6 if k % 96 < 32 else 1.1 for k in range(steps)),
        export_price=tuple(0.1 for _ in range(steps)),
    )
    return CycleCompleted(
        cycle=cycle,
        time=time,
        duration_s=0.2,
        period_s=10.0,
        overrun=False,
        overruns_total=0,
        phase_s={"read": 0.05, "decide": 0.1, "write": 0.05},
        snapshot=Snapshot(time=time, mono=mono, batteries=batteries, meter=meter),
        plan=plan,
        setpoints={d: Setpoint(d, power_w[d], mono, 60.0, "optimizer") for d in devices},
        device_states=dict.fromkeys(devices, DeviceState.RUNNING),
        device_counters={d: DeviceCounters(requests_total=cycle) for d in devices},
        grid_power_w=grid_power_w,
        import_limit_w=9000.0,
        export_limit_w=5000.0,
        import_price=0.6,
        export_price=0.1,
        carbon_intensity_g_per_kwh=581.0,
        totals=SiteTotals(imported_wh=100.0 * cycle, exported_wh=5.0, cost=0.06 * cycle),
        mode=mode,
        reserve_soc=reserve_soc,
    )


@dataclass
class RecordingTarget:
    """An in-memory CommandTarget that records every applied command (not a mock).

    It refuses what the daemon refuses: a reserve at or above max SoC, setpoints outside
    manual mode or for an unknown device.
    """

    devices: tuple[str, ...] = ("bess1", "home2")
    chargers: tuple[str, ...] = ("cp1",)
    mode: str = "auto"
    reserve: float = 0.1
    max_soc: float = 0.95
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def set_mode(self, mode: str) -> None:
        """Record the new mode."""
        self.mode = mode
        self.calls.append(("mode", mode))

    def set_reserve(self, reserve_soc: float) -> None:
        """Record the reserve; refuse one at or above max SoC."""
        if reserve_soc >= self.max_soc:
            raise CommandRejected(f"reserve_soc: must be below max SoC {self.max_soc}")
        self.reserve = reserve_soc
        self.calls.append(("reserve", reserve_soc))

    def set_manual_setpoint(self, device_id: str, power_w: float, expires_at: float) -> None:
        """Record a setpoint; only in manual mode and for a known device."""
        if self.mode != "manual":
            raise CommandRejected(f"mode: setpoints need manual mode (mode is {self.mode})")
        if device_id not in self.devices:
            raise CommandRejected(f"device: unknown device {device_id!r}")
        self.calls.append(("setpoint", (device_id, power_w, expires_at)))

    def set_price_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float]
    ) -> None:
        """Record a price series."""
        self.calls.append(("prices", (quantity, start, step_s, tuple(values))))

    def set_forecast_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float]
    ) -> None:
        """Record a forecast series."""
        self.calls.append(("forecast", (quantity, start, step_s, tuple(values))))

    def set_session_request(
        self,
        charger: str,
        departure_s: float | None,
        energy_wh: float | None,
        target_soc: float | None,
        capacity_wh: float | None,
    ) -> None:
        """Record a session request; refuse an unknown charger."""
        if charger not in self.chargers:
            raise CommandRejected(f"charger: unknown charger {charger!r}")
        self.calls.append(("session", (charger, departure_s, energy_wh, target_soc, capacity_wh)))


@dataclass(frozen=True)
class Received:
    """One message seen by a :class:`Watcher`."""

    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class Watcher:
    """A plain MQTT subscriber collecting every message on ``topics`` (a test's eyes)."""

    def __init__(self, host: str, port: int, topics: Sequence[str], **client: Any) -> None:
        client.setdefault("socket_options", ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))
        self._client = aiomqtt.Client(host, port, **client)
        self._topics = topics
        self.messages: list[Received] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        """Connect and subscribe."""
        await self._client.__aenter__()
        for t in self._topics:
            await self._client.subscribe(t, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        """Publish as another client would (e.g. an operator sending a command)."""
        await self._client.publish(topic, payload, qos=1, retain=retain)

    async def _collect(self) -> None:
        async for m in self._client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            async with self._changed:
                self.messages.append(Received(m.topic.value, payload, m.retain))
                self._changed.notify_all()

    def on(self, topic: str) -> list[Received]:
        """Every message seen on ``topic`` so far."""
        return [m for m in self.messages if m.topic == topic]

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[Received], bool] = lambda _m: True,
        *,
        within: float = 5.0,
        after: int = 0,
    ) -> Received:
        """The first message on ``topic`` (from index ``after``) satisfying ``predicate``."""

        def find() -> Received | None:
            for m in self.messages[after:]:
                if m.topic == topic and predicate(m):
                    return m
            return None

        await self.wait_until(lambda: find() is not None, within=within)
        found = find()
        assert found is not None
        return found

    async def wait_until(self, condition: Callable[[], bool], *, within: float = 5.0) -> None:
        """Return once ``condition()`` holds (checked on every received message)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(condition)


def mqtt_config(port: int, **overrides: Any) -> MqttConfig:
    """An MqttConfig for the test broker with fast reconnects."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "keepalive_s": 5,
    }
    values.update(overrides)
    return MqttConfig(**values)


async def _child(port: int, site_id: str) -> None:
    bus = EventBus()
    async with MqttBridge(mqtt_config(port), site_id, bus, RecordingTarget(), RealClock()) as b:
        bus.publish(make_cycle(1))
        await asyncio.wait_for(b.wait_connected(), 10)
        print("ready", flush=True)
        await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(_child(int(sys.argv[1]), sys.argv[2]))
