"""Runner-level events of a HIL scenario: wall-clock steps, signals and operator commands.

Faults (``hil_sim.faults``) act on the simulated devices; these events act on the daemon:

- ``wall_clock_step`` (``step_s``, either sign): the daemon's wall clock steps, as NTP or an
  operator does, while the simulator's time (the physics, the devices' timers) does not. The
  controller sees the time through a :class:`DaemonClock`: the simulator's ``now()`` plus an
  offset, the very same ``monotonic()``.
- ``signal`` (``SIGHUP``, ``SIGQUIT``, ``SIGUSR1``, ``SIGUSR2``, ``SIGALRM``, ``SIGTERM``,
  ``SIGINT``): what essd's signal handler does, the safe stop (``Controller.safe_stop``); then,
  ``restart_after`` of simulated time later (while the devices revert by their own timers),
  a new controller built like the first takes ``restore(old.durable_state())``, as systemd's
  restart of essd with its state directory does.
- ``command`` (``topic``, ``payload``, ``retain``, ``burst``): an operator command arrives on
  ``cmd/<topic>`` and goes through what the MQTT bridge does with it (a retained command is
  refused; ``standby`` is applied on arrival and supersedes queued ``mode``/``setpoint``
  commands; the others wait in the bounded :class:`essd.command_queue.CommandQueue` and are
  checked against the limits of the scenario's ``[mqtt]`` section, or their defaults). With
  ``burst: N`` the command arrives N times at once, followed by a ``standby``. Every reply is
  recorded.

Each event is reported like a fault: the rungs and device states of the cycles in its window,
the time until every affected unit was truly at 0 W, the recovery, and a command's replies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.factory import EndpointPool
from essd.clock import Clock, SimClock
from essd.command_handling import apply_command, echo_id, is_safety_command, read_command
from essd.command_queue import REFUSED_RETAINED, SUPERSEDED_BY_STANDBY, CommandQueue
from essd.commands import CommandLimits, CommandModel, CommandResult
from essd.config import MqttConfig, Settings
from essd.cycle import Controller
from essd.hil.kpi import CycleRecord, Sample
from essd.hil.scenario import EventSpec

#: A unit counts as safe at or below this true power, W.
SAFE_POWER_W = 1.0
#: How long after its window an event's units are watched for reaching 0 W, s.
SAFE_SEARCH_S = 3600.0


def event_label(i: int, e: EventSpec) -> str:
    """The label cycle records carry while the event is in its window."""
    return f"e{i}:{e.kind}:{e.what()}"


def event_window(e: EventSpec, cycle_period: float) -> tuple[float, float]:
    """Offsets (s) during which cycles are attributed to ``e``."""
    length = e.window if e.window is not None else e.downtime_s + 2 * cycle_period
    return e.at, e.at + max(length, cycle_period)


def mqtt_limits(mqtt: MqttConfig | None, settings: Settings) -> tuple[CommandLimits, int]:
    """The command limits and queue size of the bridge for ``mqtt`` (defaults when None)."""
    from essd.mqtt import command_limits  # noqa: PLC0415  (the adapter, only when needed)

    cfg = mqtt or MqttConfig(host="localhost")
    return command_limits(cfg, settings.control), cfg.command_queue_size


class DaemonClock:
    """The daemon's view of a :class:`SimClock`: its wall time plus ``offset`` (a wall-clock
    step), the same monotonic time and sleeps, so stepping the daemon's wall clock never
    moves the simulator's."""

    def __init__(self, base: SimClock) -> None:
        self._base = base
        self.offset = 0.0

    @property
    def stepped(self) -> bool:
        """As the simulator's clock."""
        return self._base.stepped

    @property
    def speed(self) -> float:
        """As the simulator's clock."""
        return self._base.speed

    def now(self) -> float:
        """The simulator's wall time plus the step(s) of the daemon's wall clock."""
        return self._base.now() + self.offset

    def monotonic(self) -> float:
        """The simulator's monotonic time (a wall-clock step never moves it)."""
        return self._base.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the simulator's clock."""
        await self._base.sleep(seconds)

    def step_wall(self, seconds: float) -> None:
        """Step the daemon's wall clock alone."""
        if not math.isfinite(seconds):
            raise ValueError(f"seconds: must be finite, got {seconds!r}")
        self.offset += seconds


@dataclass
class CommandFeed:
    """What the MQTT bridge does with arriving commands, without a broker (see essd.mqtt)."""

    target: Controller
    clock: Clock
    limits: CommandLimits
    queue: CommandQueue

    def receive(self, name: str, payload: bytes, *, retained: bool) -> None:
        """One message on ``cmd/<name>``: refuse it, apply it now (standby), or queue it."""
        if retained:
            self.queue.put(
                name, CommandResult(ok=False, error=REFUSED_RETAINED, id=echo_id(payload))
            )
            return
        command = read_command(name, payload)
        if is_safety_command(command):
            assert isinstance(command, CommandModel)
            self.queue.supersede(SUPERSEDED_BY_STANDBY)
            self.queue.reply(name, self._apply(command))
            return
        self.queue.put(name, command)

    def _apply(self, command: CommandModel) -> CommandResult:
        return apply_command(command, self.target, now=self.clock.now(), limits=self.limits)

    def drain(self) -> list[tuple[str, CommandResult]]:
        """Apply the queued commands in order; every reply, in the order it would be sent."""
        out = []
        while (item := self.queue.pop()) is not None:
            cmd = item.command
            out.append((item.name, cmd if isinstance(cmd, CommandResult) else self._apply(cmd)))
        return out


@dataclass
class EventDriver:
    """Applies a scenario's events between cycles and owns the controller in force.

    ``build`` makes a controller (and its endpoint pool) as the first one was made.
    """

    events: Sequence[EventSpec]
    start: float
    cycle_period: float
    clock: DaemonClock
    build: Callable[[], tuple[Controller, EndpointPool]]
    limits: CommandLimits
    queue_size: int
    controller: Controller | None = None
    pool: EndpointPool | None = None
    replies: dict[int, list[tuple[str, CommandResult]]] = field(default_factory=dict)
    stopped: dict[int, dict[str, bool]] = field(default_factory=dict)
    restarted_at: dict[int, float] = field(default_factory=dict)
    restore_errors: dict[int, str] = field(default_factory=dict)
    _done: set[int] = field(default_factory=set)
    _down: tuple[int, float, dict[str, Any]] | None = None  # (event, restart at, state)

    def __post_init__(self) -> None:
        self.controller, self.pool = self.build()

    def labels(self, offset: float) -> tuple[str, ...]:
        """Labels of the events whose window holds ``offset``."""
        return tuple(
            event_label(i, e)
            for i, e in enumerate(self.events)
            if event_window(e, self.cycle_period)[0]
            <= offset
            < event_window(e, self.cycle_period)[1]
        )

    async def due(self, now: float) -> Controller | None:
        """Apply the events due by ``now`` (simulator epoch s); the controller to run a cycle
        with, or None while essd is down after a signal."""
        await self._restart_if_due(now)
        for i, e in enumerate(self.events):
            if i in self._done or self.start + e.at > now:
                continue
            self._done.add(i)
            if e.kind == "wall_clock_step":
                self.clock.step_wall(e.step_s)
            elif e.kind == "signal":
                await self._stop(i, now + e.downtime_s)
            elif self.controller is not None:
                self.replies[i] = self._command(e)
            else:
                # essd is down: nobody receives the command (the bridge is gone with it).
                self.replies[i] = [(e.name, CommandResult(ok=False, error="essd: not running"))]
        await self._restart_if_due(now)
        return None if self._down is not None else self.controller

    def _command(self, e: EventSpec) -> list[tuple[str, CommandResult]]:
        assert self.controller is not None
        feed = CommandFeed(self.controller, self.clock, self.limits, CommandQueue(self.queue_size))
        for _ in range(e.burst or 1):
            feed.receive(e.name, e.payload_bytes(), retained=e.retain)
        if e.burst is not None:
            feed.receive("mode", b'{"mode":"standby"}', retained=False)
        return feed.drain()

    async def _stop(self, i: int, restart_at: float) -> None:
        if self.controller is None or self._down is not None:
            return
        self.stopped[i] = await self.controller.safe_stop(1.0)
        state = self.controller.durable_state()
        await self.close_pool()
        self._down = (i, restart_at, state)

    async def _restart_if_due(self, now: float) -> None:
        if self._down is None or now < self._down[1]:
            return
        i, _, state = self._down
        self._down = None
        self.controller, self.pool = self.build()
        try:
            self.controller.restore(state)
        except ValueError as exc:  # reported; the run goes on with a fresh state
            self.restore_errors[i] = str(exc)
        self.restarted_at[i] = now

    async def close_pool(self) -> None:
        """Close the endpoint pool of the controller in force."""
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def close(self) -> None:
        """The end of the run: safe stop of the controller in force (if up), pool closed."""
        if self._down is None and self.controller is not None:
            await self.controller.safe_stop(1.0)
        await self.close_pool()


def safe_after_s(
    samples: Sequence[Sample], devices: Sequence[str], start: float, until: float
) -> float | None:
    """Seconds from ``start`` until every unit of ``devices`` was truly at 0 W (its safe mode
    holds 0 W), searched up to ``until`` (epoch s); None when that never happened."""
    for s in samples:
        if s.time < start or s.time > until:
            continue
        powers = [s.truth.batteries[d].power_w for d in devices if d in s.truth.batteries]
        if all(abs(p) <= SAFE_POWER_W for p in powers):
            return s.time - start
    return None


def _reply_summary(replies: Sequence[tuple[str, CommandResult]]) -> dict[str, Any]:
    refused = Counter(r.error for _, r in replies if not r.ok)
    return {
        "total": len(replies),
        "ok": sum(1 for _, r in replies if r.ok),
        "refused": dict(refused.most_common()),
        "last": [f"{n}: {'ok' if r.ok else r.error}" for n, r in replies[-3:]],
    }


def event_summary(
    driver: EventDriver,
    *,
    cycles: Sequence[CycleRecord],
    samples: Sequence[Sample],
    batteries: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per event for kpis.json and the report, like the faults' rows."""
    out = []
    for i, e in enumerate(driver.events):
        label = event_label(i, e)
        lo, hi = event_window(e, driver.cycle_period)
        t0, t1 = driver.start + lo, driver.start + hi
        during = [c for c in cycles if label in c.active_faults]
        after = [c for c in cycles if c.time >= t0 + e.downtime_s]
        units = _units_of(e, batteries)
        recovered = next(
            (
                c.time - t0
                for c in after
                if all(c.device_states.get(d) == "running" for d in units)
                and c.cause not in ("standby",)
            ),
            None,
        )
        row: dict[str, Any] = {
            "index": i,
            "kind": e.kind,
            "what": e.what(),
            "at_s": e.at,
            "window_s": hi - lo,
            "devices": list(units),
            "cycles": len(during),
            "worst_rung": max((c.rung for c in during), default=0),
            "rungs": sorted({c.rung for c in during}),
            "causes": sorted({c.cause for c in during}),
            "device_states": sorted({c.device_states.get(d, "?") for c in during for d in units}),
            "safe_after_s": safe_after_s(samples, units, t0, t1 + SAFE_SEARCH_S),
            "recovered_after_s": recovered,
        }
        if e.kind == "signal":
            row["safe_stop"] = driver.stopped.get(i, {})
            restarted = driver.restarted_at.get(i)
            row["restarted_after_s"] = None if restarted is None else restarted - t0
            row["restore_error"] = driver.restore_errors.get(i, "")
        if e.kind == "command":
            row["replies"] = _reply_summary(driver.replies.get(i, []))
        out.append(row)
    return out


def _units_of(e: EventSpec, batteries: Sequence[str]) -> list[str]:
    if e.kind == "command" and isinstance(e.payload, Mapping):
        dev = e.payload.get("device")
        if isinstance(dev, str) and dev in batteries and e.burst is None:
            return [dev]
    return list(batteries)
