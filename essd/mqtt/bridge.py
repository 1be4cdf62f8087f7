"""The MQTT bridge: publishes the cycle's events and applies commands, never blocking a cycle.

Commands: applied only over an authenticated connection (username and password, or a TLS
client certificate) unless ``allow_anonymous_control`` is set; never when retained (MQTT 5
with retain-as-published shows the publisher's flag even on live delivery); checked against
the configured limits; queued in a bounded :class:`essd.command_queue.CommandQueue` where an
overflow answers the oldest ``dropped``. ``standby`` is applied on arrival, ahead of anything
queued. The receiver only moves messages from aiomqtt (whose own queue is unbounded, so it
never drops silently) into that queue; a separate task applies them and sends the replies.

Decoupling: the bridge subscribes to the :class:`essd.events.EventBus` with a handler that only
stores a reference to the newest event and wakes the MQTT task (O(1), never awaits, never
serializes), so a slow or absent broker cannot delay a control cycle. The MQTT task builds the
payloads from the newest values when it gets to them (older values are simply superseded),
reconnects with jittered exponential back-off on the injected clock, and republishes every
retained topic after each reconnect. The clock serves the back-off waits and "now" for
commands; payload times come from the events. (A *stepped* SimClock cannot wait, its ``sleep``
moves simulated time for everyone, so with one the back-off waits in real time.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Self

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from essd.clock import Backoff, Clock, RealClock, sleep_or_stop
from essd.command_handling import apply_command, echo_id, is_safety_command, read_command
from essd.command_queue import REFUSED_RETAINED, SUPERSEDED_BY_STANDBY, CommandQueue
from essd.commands import CommandLimits, CommandModel, CommandResult, CommandTarget
from essd.config import ControlConfig, MqttConfig, Settings
from essd.domain import DeviceState, Plan
from essd.events import (
    CommandHandled,
    CycleCompleted,
    DaemonStatus,
    DaemonStatusChanged,
    DeviceStateChanged,
    Event,
    EventBus,
    MqttConnectionChanged,
)
from essd.mqtt.command_rules import REFUSED_ANONYMOUS, command_limits
from essd.mqtt.discovery import DiscoveryPublisher
from essd.mqtt.payloads import build_device_payload, build_plan_payload, build_state_payload
from essd.mqtt.topics import Topics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BridgeStats:
    """Counters of one bridge since it was created (read them, do not write)."""

    connects_total: int = 0
    connect_failures_total: int = 0
    messages_published_total: int = 0
    commands_total: int = 0
    commands_rejected_total: int = 0
    commands_dropped_total: int = 0
    events_received_total: int = 0


_Dirty = Literal["status", "state", "plan", "discovery"]


class MqttBridge:
    """Publishes bus events over MQTT and feeds commands to the daemon.

    Use as ``async with MqttBridge(...):`` (starts a background task, stops it cleanly with a
    retained ``offline``), or run :meth:`run` in a TaskGroup and call :meth:`stop`.
    ``target`` None makes the bridge read-only (every command is refused). ``limits``
    default to :func:`command_limits` with the default ``[control]`` section.
    """

    def __init__(
        self,
        config: MqttConfig,
        site_id: str,
        bus: EventBus,
        target: CommandTarget | None,
        clock: Clock,
        *,
        currency: str = "",
        rng: random.Random | None = None,
        limits: CommandLimits | None = None,
        charger_ids: tuple[str, ...] = (),
    ) -> None:
        self._config = config
        self._site_id = site_id
        self._bus = bus
        self._target = target
        self._clock = clock
        self._currency = currency
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        # Jittered: half to full of min(max, min * 2**attempt).
        self.backoff = Backoff(
            initial_s=config.reconnect_min_s, max_s=config.reconnect_max_s, jitter=0.5
        )
        self.topics = Topics.of(config, site_id)
        self.stats = BridgeStats()
        self.limits = limits or command_limits(config, ControlConfig())
        # Unique per bridge: two processes sharing an id would take each other's session over
        # (and fire each other's "offline" will) in a loop.
        self.client_id = config.client_id or f"essd-{site_id}-{secrets.token_hex(4)}"
        self._commands = CommandQueue(config.command_queue_size)
        # Latest-value cache, written synchronously by the bus handler.
        self._cycle: CycleCompleted | None = None
        self._daemon_status: DaemonStatus | None = None
        # Device id -> (lifecycle state, reason of the last change, time of the newest news).
        self._device_state: dict[str, tuple[DeviceState, str, float]] = {}
        self._dirty: set[_Dirty] = set()
        self._dirty_devices: set[str] = set()
        # EV chargers get Home Assistant entities for their session requests (cmd/session).
        self._discovery = DiscoveryPublisher(
            self.topics,
            currency=currency,
            setpoint_ttl_s=config.ha_setpoint_ttl_s,
            charger_ids=charger_ids,
        )
        self._plan_sent: Plan | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected = asyncio.Event()
        self._unsubscribe = bus.subscribe(self._on_event)
        self._task: asyncio.Task[None] | None = None
        self._retained_cmd_warned = False
        self._failing = False

    # ------------------------------------------------------------------ bus side (sync)

    def _on_event(self, event: Event) -> None:
        """Bus subscriber: remember the newest value and wake the sender. Never blocks."""
        self.stats.events_received_total += 1
        if isinstance(event, CycleCompleted):
            self._cycle = event
            for d, s in event.device_states.items():
                old = self._device_state.get(d)
                reason = old[1] if old is not None and old[0] is s else ""
                self._device_state[d] = (s, reason, event.time)
            self._dirty.update(("state", "plan"))
            self._dirty_devices.update(self._device_state)
        elif isinstance(event, DeviceStateChanged):
            self._device_state[event.device_id] = (event.new, event.reason, event.time)
            self._dirty_devices.add(event.device_id)
        elif isinstance(event, DaemonStatusChanged):
            self._daemon_status = event.status
            self._dirty.add("status")
        else:
            return
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while a broker session is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Return once a broker session is up (use with a timeout)."""
        await self._connected.wait()

    async def __aenter__(self) -> Self:
        """Start the MQTT task."""
        self._task = asyncio.create_task(self.run(), name=f"mqtt-bridge-{self._site_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Publish ``offline``, disconnect and stop the task."""
        await self.stop()

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stop cleanly: publish retained ``offline``, disconnect, unsubscribe from the bus."""
        self._stopping.set()
        self._wake.set()
        self._unsubscribe()
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.warning("MQTT bridge did not stop within %.1f s; cancelling it", timeout_s)
                await self._cancel(task)

    def _client(self) -> aiomqtt.Client:
        cfg = self._config
        tls = None
        if cfg.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        v5 = cfg.protocol == "5"
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            keepalive=cfg.keepalive_s,
            tls_params=tls,
            timeout=10.0,
            # Unbounded: a bounded aiomqtt queue drops silently when full (after the broker
            # had its PUBACK). The receive loop empties it at once into the bounded command
            # queue, which answers whatever it has to drop.
            max_queued_incoming_messages=0,
            # Small messages and request/reply commands: do not let Nagle hold them back.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def run(self) -> None:
        """Connect, publish and take commands until :meth:`stop`; reconnect with back-off."""
        for warning in self._config.security_warnings():
            if self._target is not None or "commands" not in warning:
                log.warning("%s", warning)
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with self._client() as client:
                    attempt = 0
                    self.stats.connects_total += 1
                    if self._failing:
                        log.info("MQTT connection to %s:%s restored", *self._addr())
                        self._failing = False
                    else:
                        log.info("MQTT connected to %s:%s", *self._addr())
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.stats.connect_failures_total += 1
                if not self._failing:
                    # Log the transition once, not every retry.
                    log.warning(
                        "MQTT %s:%s unreachable or connection lost (%s); retrying with back-off",
                        *self._addr(),
                        exc,
                    )
                    self._failing = True
            except Exception:
                # A bug here must not end publishing for good (nor reach the control loop).
                self.stats.connect_failures_total += 1
                log.exception("MQTT session failed; reconnecting")
                self._failing = True
            finally:
                if self._connected.is_set():
                    self._connected.clear()
                    self._bus.publish(MqttConnectionChanged(False, self._clock.now()))
            if self._stopping.is_set():
                break
            attempt += 1
            await self._wait_to_reconnect(attempt)

    def _addr(self) -> tuple[str, int]:
        return self._config.host, self._config.port

    async def _wait_to_reconnect(self, failures: int) -> None:
        # A stepped simulated clock does not wait: its sleep would jump simulated time for the
        # whole daemon. The back-off is about a real broker, so then it waits in real time.
        clock = RealClock() if math.isinf(self._clock.speed) else self._clock
        await sleep_or_stop(clock, self.backoff.delay_s(failures, self._rng), self._stopping)

    def _status_payload(self) -> bytes:
        stopping = self._daemon_status in (DaemonStatus.STOPPING, DaemonStatus.OFFLINE)
        return b"offline" if stopping or self._stopping.is_set() else b"online"

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool, qos: int = 0
    ) -> None:
        await client.publish(topic, payload, qos=qos, retain=retain)
        self.stats.messages_published_total += 1

    async def _session(self, client: aiomqtt.Client) -> None:
        """One broker session: subscribe, announce, then send and receive until stop.

        ``online`` is announced only once the command subscription is in place, so a command
        sent by anyone who sees ``online`` is never lost.
        """
        if self._config.protocol == "5":
            # Retain-as-published: a retained command keeps its flag even when delivered live.
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            await client.subscribe(self.topics.commands, options=options)
        else:
            await client.subscribe(self.topics.commands, qos=1)
        if self._config.ha_discovery:
            await client.subscribe(self.topics.ha_status, qos=1)
            await client.subscribe(self._discovery.filter, qos=1)  # to clear stale configs
        await self._publish(client, self.topics.status, self._status_payload(), retain=True, qos=1)
        # A new session (the broker may have lost its retained store): republish everything.
        self._dirty.update(("state", "plan", "discovery"))
        self._dirty_devices.update(self._device_state)
        self._discovery.invalidate()
        self._plan_sent = None
        self._wake.set()
        self._connected.set()
        self._bus.publish(MqttConnectionChanged(True, self._clock.now()))
        send = asyncio.create_task(self._send_loop(client), name="mqtt-send")
        receive = asyncio.create_task(self._receive_loop(client), name="mqtt-receive")
        command = asyncio.create_task(self._command_loop(client), name="mqtt-commands")
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop")
        tasks = {send, receive, command, stop}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Cancelled without stop(): still leave a retained "offline" if we can.
            await self._cancel(*tasks)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topics.status, b"offline", qos=1, retain=True, timeout=1)
            raise
        await self._cancel(*tasks)
        for t in done:
            error = None if t is stop else t.exception()
            if error is not None:
                raise error  # the session ended on a broken connection (or a bug)
        # Clean stop: flush the newest values, then "offline" (a clean disconnect fires no will).
        for topic, payload, retain in self._drain():
            await self._publish(client, topic, payload, retain=retain)
        await self._publish(client, self.topics.status, b"offline", retain=True, qos=1)

    @staticmethod
    async def _cancel(*tasks: asyncio.Task[Any]) -> None:
        # Cancel until done: on Python 3.11 asyncio.wait_for (used inside aiomqtt) can swallow
        # a cancellation that races with its inner future completing, and a loop task would
        # then carry on; one retry is all it takes.
        pending = {t for t in tasks if not t.done()}
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for t in tasks:
            if not t.cancelled():
                t.exception()  # retrieved, so asyncio does not log it as never retrieved

    def _drain(self) -> Iterator[tuple[str, bytes, bool]]:
        """Build the payloads of everything that changed since the last drain (newest only)."""
        dirty, self._dirty = self._dirty, set()
        devices, self._dirty_devices = self._dirty_devices, set()
        cycle = self._cycle
        if "status" in dirty:
            yield self.topics.status, self._status_payload(), True
        if cycle is not None and "state" in dirty:
            yield self.topics.state, build_state_payload(self._site_id, cycle).to_payload(), True
        # A plan is re-sent only when the core produced a new one (it is the largest payload).
        if cycle is not None and "plan" in dirty and cycle.plan is not self._plan_sent:
            self._plan_sent = cycle.plan
            plan = build_plan_payload(self._site_id, cycle.plan, cycle.forecast)
            yield self.topics.plan, plan.to_payload(), True
        for d in sorted(devices):
            state, reason, when = self._device_state[d]
            payload = build_device_payload(
                self._site_id, d, time=when, state=state, reason=reason, cycle=cycle
            )
            yield self.topics.device(d), payload.to_payload(), True
        if self._config.ha_discovery:
            if "discovery" in dirty:
                self._discovery.invalidate()
            for topic, body in self._discovery.messages(cycle):
                yield topic, body, True

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while not self._stopping.is_set():
            await self._wake.wait()
            self._wake.clear()
            for topic, payload, retain in self._drain():
                await self._publish(client, topic, payload, retain=retain)

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        """Move each message into the command queue at once; never waits on the network."""
        prefix = self.topics.command("")
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic == self.topics.ha_status:
                if payload == b"online":
                    # Home Assistant (re)started: send discovery and the current state again.
                    self._dirty.update(("state", "plan", "discovery"))
                    self._dirty_devices.update(self._device_state)
                    self._wake.set()
                continue
            if self._config.ha_discovery and topic.endswith("/config"):
                if message.retain and self._discovery.seen(topic, payload):
                    self._dirty.add("discovery")
                    self._wake.set()
                continue
            if topic.startswith(prefix):
                self._receive_command(topic[len(prefix) :], payload, retained=message.retain)

    def _receive_command(self, name: str, payload: bytes, *, retained: bool) -> None:
        """Classify one command: refuse it, apply it now (standby), or queue it."""
        if retained:
            # A retained command would be re-applied on every reconnect: never act on one.
            if not self._retained_cmd_warned:
                log.warning("ignoring retained MQTT command on cmd/%s (send it unretained)", name)
                self._retained_cmd_warned = True
            self._queue(name, CommandResult(ok=False, error=REFUSED_RETAINED, id=echo_id(payload)))
            return
        if self._target is not None and not self._config.commands_enabled:
            self._queue(name, CommandResult(ok=False, error=REFUSED_ANONYMOUS, id=echo_id(payload)))
            return
        command = read_command(name, payload)
        if is_safety_command(command):
            # Standby wins: applied on arrival, and nothing older still queued can undo it.
            assert isinstance(command, CommandModel)
            dropped = self._commands.supersede(SUPERSEDED_BY_STANDBY)
            self.stats.commands_dropped_total += dropped
            self._commands.reply(name, self._apply(name, command))
            return
        self._queue(name, command)

    def _queue(self, name: str, command: CommandModel | CommandResult) -> None:
        if not self._commands.put(name, command):
            self.stats.commands_dropped_total += 1
            if self.stats.commands_dropped_total == 1:
                log.warning(
                    "MQTT command queue full (%d): dropping the oldest commands, answered "
                    "'dropped'",
                    self._commands.maxsize,
                )

    def _apply(self, name: str, command: CommandModel) -> CommandResult:
        result = apply_command(command, self._target, now=self._clock.now(), limits=self.limits)
        if result.ok:
            log.info("MQTT command %s applied", name)
        return result

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        """Apply queued commands one at a time, in order, and send every reply."""
        while True:
            item = await self._commands.get()
            command = item.command
            result = (
                command if isinstance(command, CommandResult) else self._apply(item.name, command)
            )
            self.stats.commands_total += 1
            if not result.ok:
                self.stats.commands_rejected_total += 1
                log.debug("MQTT command %s refused: %s", item.name, result.error)
            self._bus.publish(
                CommandHandled(
                    name=item.name, ok=result.ok, error=result.error, time=self._clock.now()
                )
            )
            await self._publish(
                client, self.topics.result(item.name), result.to_payload(), retain=False, qos=1
            )


@contextlib.asynccontextmanager
async def open_bridge(
    settings: Settings, bus: EventBus, target: CommandTarget | None, clock: Clock
) -> AsyncIterator[MqttBridge | None]:
    """A running :class:`MqttBridge` for ``settings`` (None when ``[mqtt]`` is not configured).

    Stops it cleanly (retained ``offline``) on exit.
    """
    if settings.mqtt is None:
        yield None
        return
    bridge = MqttBridge(
        settings.mqtt,
        settings.site.id,
        bus,
        target,
        clock,
        currency=settings.tariff.currency,
        limits=command_limits(settings.mqtt, settings.control),
        charger_ids=tuple(key for c in settings.chargers for key in c.connector_ids),
    )
    async with bridge:
        yield bridge
