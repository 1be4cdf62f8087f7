"""Per-device lifecycle: reading with a timeout, health, the state machine and safe writes.

One :class:`ManagedDevice` wraps one driver. Its state machine (connecting, running,
degraded, fault, safe) logs transitions only: a failure once when it starts, a recovery once
when it ends. Writes happen only when the setpoint changes or a refresh is due (at most every
TTL/3, or a third of the device's own revert/heartbeat timeout), so device flash is not worn
by identical writes and a crashed essd still leaves every device reverting to safe.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid W > 0 imports.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from drivers.api import (
    ActivePowerControl,
    ChargeLimitControl,
    CommunicationError,
    DeviceDriver,
    DeviceError,
    DeviceExceptionResponse,
    HeartbeatControl,
    RevertTimerControl,
    SafeModeControl,
    WriteResult,
)
from drivers.profile import Capability, Profile
from essd.clock import Clock
from essd.config import DeviceConfig
from essd.counters import DeviceCounters
from essd.domain import (
    BatteryReading,
    DeviceClass,
    DeviceState,
    MeterReading,
    Quality,
    Reading,
    Setpoint,
)
from essd.events import DeviceStateChanged, EventBus, WriteOutcome, WriteStatus
from essd.safety import DeviceEnvelope

log = logging.getLogger(__name__)

# A change smaller than this (W) does not justify a write before the refresh is due.
WRITE_DEADBAND_W = 20.0
# A meter's registers unchanged this long: the data is frozen. (Storage units are judged by
# physics in essd.credibility: identical readings are normal at idle or low power.)
FROZEN_AFTER_S = 300.0
# Cycles in a row whose write failed before a unit counts as not controlled (WRITE_FAILED).
WRITE_FAILED_AFTER = 2


def envelope_for(
    cfg: DeviceConfig, profile: Profile, *, reserve_soc: float, max_soc: float, ramp: float | None
) -> DeviceEnvelope:
    """The static safety envelope of a storage unit: the tighter of profile and configuration."""
    r = profile.ratings
    max_ch = r.max_charge_w if cfg.max_charge_w is None else min(r.max_charge_w, cfg.max_charge_w)
    max_dis = (
        r.max_discharge_w
        if cfg.max_discharge_w is None
        else min(r.max_discharge_w, cfg.max_discharge_w)
    )
    can_discharge = profile.has(Capability.ACTIVE_POWER)
    can_charge = can_discharge or profile.has(Capability.CHARGE_LIMIT)
    return DeviceEnvelope(
        device_id=cfg.id,
        capacity_wh=cfg.capacity_wh or r.capacity_wh,
        max_charge_w=max_ch if can_charge else 0.0,
        max_discharge_w=max_dis if can_discharge else 0.0,
        reserve_soc=max(reserve_soc, cfg.reserve_soc or 0.0),
        max_soc=min(max_soc, cfg.max_soc if cfg.max_soc is not None else 1.0),
        charge_efficiency=r.charge_efficiency,
        discharge_efficiency=r.discharge_efficiency,
        can_charge=can_charge,
        can_discharge=can_discharge,
        ramp_w_per_s=ramp,
    )


def refresh_warning(cfg: DeviceConfig, profile: Profile, cycle_period_s: float) -> str | None:
    """Why ``cycle_period_s`` is too long for a device's own fixed timeout, or None.

    A device that drops a command (or goes safe) when it is not refreshed within a fixed time
    needs at least two writes inside that time, or one missed cycle makes it revert.
    """
    b = profile.behaviour
    fixed = []
    if b.setpoint_timeout_s is not None and not b.revert_timer_configurable:
        fixed.append(("drops a setpoint not refreshed within", b.setpoint_timeout_s))
    if b.heartbeat_timeout_s is not None:
        fixed.append(("goes safe without a heartbeat within", b.heartbeat_timeout_s))
    for what, timeout in fixed:
        if cycle_period_s > timeout / 2:
            return (
                f"device {cfg.id} ({profile.name}) {what} {timeout:g} s, but "
                f"control.cycle_period_s is {cycle_period_s:g} s: use {timeout / 2:g} s or less, "
                "or the device will keep reverting between cycles"
            )
    return None


def revert_warning(cfg: DeviceConfig, profile: Profile) -> str | None:
    """Why a device essd can force would keep its last command if essd died, or None.

    A unit with a power setpoint or a charge limit but neither a revert timer (fixed or
    configurable) nor a heartbeat holds whatever essd wrote last until someone intervenes.
    """
    if profile.has(Capability.ACTIVE_POWER):
        command = "power setpoint"
    elif profile.has(Capability.CHARGE_LIMIT):
        command = "charge limit"
    else:
        return None
    b = profile.behaviour
    if (
        b.setpoint_timeout_s is not None
        or b.heartbeat_timeout_s is not None
        or profile.has(Capability.REVERT_TIMER)
        or profile.has(Capability.HEARTBEAT)
    ):
        return None
    return (
        f"device {cfg.id} ({profile.name}) has neither a revert timer nor a heartbeat: it stays "
        f"in forced charge/discharge if essd dies (its last {command} stays in force)"
    )


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "read_deadline"  # the whole read overran its budget (not one request)
    if isinstance(exc, DeviceExceptionResponse):
        return "exception"
    if isinstance(exc, CommunicationError):
        return "communication"
    return "other"


class ManagedDevice:
    """One device as the control cycle sees it."""

    def __init__(
        self,
        *,
        config: DeviceConfig,
        profile: Profile,
        driver: DeviceDriver,
        envelope: DeviceEnvelope | None,
        clock: Clock,
        bus: EventBus,
        ttl_s: float,
        stale_after_s: float,
    ) -> None:
        self.config = config
        self.profile = profile
        self.driver = driver
        self.envelope = envelope
        self._clock = clock
        self._bus = bus
        self.ttl_s = ttl_s
        self.stale_after_s = stale_after_s
        self.state = DeviceState.CONNECTING
        self.reason = "starting"
        self.last: BatteryReading | MeterReading | None = None
        self.last_good_mono: float | None = None
        self.written: Setpoint | None = None
        self._written_at: float | None = None
        self._heartbeat_at: float | None = None
        self._setup_done = False
        self._unchanged_since: float | None = None
        self._last_signature: tuple[float | None, ...] | None = None
        self._deadlines = 0  # whole reads that overran their budget (the wire counts the rest)
        self.safe_written = False
        self._mismatching = False
        # The write phase's own record: last accepted write and the failures since.
        self.accepted_at_mono: float | None = None
        self.write_failures = 0
        self.last_write_error = ""
        self.safe_mode_unconfirmed = False
        self._warnings: tuple[str, ...] = ()  # the device's warnings, logged when they change

    @property
    def id(self) -> str:
        """The device id."""
        return self.config.id

    @property
    def is_meter(self) -> bool:
        """True for the grid meter."""
        return self.profile.device_class is DeviceClass.METER

    # --- state machine -------------------------------------------------------------------

    def _transition(self, new: DeviceState, reason: str) -> None:
        if new is self.state:
            self.reason = reason
            return
        old, self.state, self.reason = self.state, new, reason
        level = logging.INFO if new in (DeviceState.RUNNING, DeviceState.SAFE) else logging.WARNING
        log.log(level, "device %s: %s -> %s (%s)", self.id, old.value, new.value, reason)
        if new is not DeviceState.RUNNING:
            self._setup_done = False  # a device that comes back is configured again
        self._bus.publish(DeviceStateChanged(self.id, old, new, reason, self._clock.now()))

    def hold_safe(self, reason: str) -> None:
        """Mark the device deliberately safe (standby, stop)."""
        self._transition(DeviceState.SAFE, reason)

    @property
    def healthy(self) -> bool:
        """True when the device's data is fresh and valid and it reports no fault."""
        if self.state is not DeviceState.RUNNING or self.last_good_mono is None:
            return False
        return self._clock.monotonic() - self.last_good_mono <= self.stale_after_s

    # --- read ----------------------------------------------------------------------------

    async def read(self, *, mode_safe: bool) -> BatteryReading | MeterReading | None:
        """Read the device within its timeout and update its state; never raises."""
        budget = self.config.poll_timeout_s * 4  # a read may take a few block requests
        try:
            async with asyncio.timeout(budget):
                await self.driver.connect()
                reading = await self.driver.read()
        except (DeviceError, TimeoutError, OSError) as exc:
            self._deadlines += isinstance(exc, TimeoutError)
            self._on_failure(exc)
            return None
        self.last = reading
        self._note_warnings(reading)
        self._evaluate(reading, mode_safe=mode_safe)
        return reading

    def _note_warnings(self, reading: BatteryReading | MeterReading) -> None:
        """Log the device's warnings (severity "warning": it stays under control) when they
        change, not every cycle."""
        warnings = reading.warnings if isinstance(reading, BatteryReading) else ()
        if warnings != self._warnings:
            if warnings:
                log.warning("device %s: warning: %s", self.id, ", ".join(warnings))
            else:
                log.info("device %s: warnings cleared", self.id)
            self._warnings = warnings

    def _on_failure(self, exc: BaseException) -> None:
        if self.profile.has(Capability.AVAILABILITY) and isinstance(
            exc, CommunicationError | TimeoutError
        ):
            reason = "not answering (unplugged?)"
        else:
            reason = f"{_error_kind(exc)}: {exc}" if str(exc) else _error_kind(exc)
        if self.state is not DeviceState.SAFE:
            self._transition(DeviceState.DEGRADED, reason)
        if isinstance(self.last, BatteryReading) and self.last.available:
            # Keep the last values for display but say the unit is gone.
            now = self._clock.monotonic()
            self.last = BatteryReading(
                device_id=self.id,
                device_class=self.last.device_class,
                read_at_mono=now,
                available=False,
                soc=_stale(self.last.soc),
                power_w=_stale(self.last.power_w),
                limits=self.last.limits,
                capacity_wh=self.last.capacity_wh,
                alarms=self.last.alarms,
            )

    def _evaluate(self, reading: BatteryReading | MeterReading, *, mode_safe: bool) -> None:
        now = self._clock.monotonic()
        if isinstance(reading, MeterReading):
            problem = None if reading.grid_power_w.valid else reading.grid_power_w.reason
            signature: tuple[float | None, ...] = (reading.grid_power_w.value,)
            moving = True
        else:
            problem = None
            if not reading.available:
                problem = "unavailable"
            elif not reading.soc.valid:
                problem = f"SoC {reading.soc.quality.value}: {reading.soc.reason}"
            elif not reading.power_w.valid:
                problem = f"power {reading.power_w.quality.value}: {reading.power_w.reason}"
            signature = (reading.soc.value, reading.power_w.value)
            moving = False  # frozen units: essd.credibility, which knows the energy moved
        if signature != self._last_signature:
            self._last_signature = signature
            self._unchanged_since = now
        elif (
            moving
            and self._unchanged_since is not None
            and now - self._unchanged_since >= FROZEN_AFTER_S
            and problem is None
        ):
            problem = f"registers frozen for {now - self._unchanged_since:.0f} s"
        if problem is not None:
            if self.state is not DeviceState.SAFE:
                self._transition(DeviceState.DEGRADED, problem)
            return
        self.last_good_mono = now
        self._settle(reading, mode_safe=mode_safe)

    def _settle(self, reading: BatteryReading | MeterReading, *, mode_safe: bool) -> None:
        """The state of a unit whose data is good: fault, safe, not controlled or running."""
        if isinstance(reading, BatteryReading) and reading.alarms:
            self._transition(DeviceState.FAULT, "alarm: " + ", ".join(reading.alarms))
            return
        if self.safe_mode_unconfirmed:
            self._transition(DeviceState.FAULT, "safe mode not confirmed by read-back")
            return
        if mode_safe and not self.is_meter:  # standby is for storage: the meter keeps metering
            # Safe only once its safe mode was written and read back (the write phase says so):
            # a unit that was told standby is not yet a unit in standby.
            if self.safe_written and self.state is not DeviceState.SAFE:
                self._transition(DeviceState.SAFE, "standby")
            return
        if self.write_failures >= WRITE_FAILED_AFTER:
            self._transition(
                DeviceState.WRITE_FAILED,
                f"{self.write_failures} writes in a row failed: {self.last_write_error}",
            )
            return
        self._transition(DeviceState.RUNNING, "ok")

    # --- write ---------------------------------------------------------------------------

    def refresh_interval_s(self) -> float:
        """How often an unchanged command is rewritten (a third of the shortest timeout)."""
        b = self.profile.behaviour
        timeouts = [self.ttl_s]
        if b.setpoint_timeout_s is not None and not b.revert_timer_configurable:
            timeouts.append(b.setpoint_timeout_s)
        if b.heartbeat_timeout_s is not None:
            timeouts.append(b.heartbeat_timeout_s)
        return min(timeouts) / 3.0

    async def _setup(self) -> None:
        """Configure the revert timer once per connection, so a silent essd leaves it safe."""
        if self._setup_done:
            return
        if (timer := self.driver.capability(RevertTimerControl)) is not None:
            self._count(await timer.configure_revert_timer(self.ttl_s))
        self._setup_done = True

    def _count(self, result: WriteResult) -> None:
        if result.mismatches:
            if not self._mismatching:  # log the transition, then count quietly
                self._mismatching = True
                log.warning(
                    "device %s: read-back mismatch: %s", self.id, "; ".join(result.mismatches)
                )
        elif self._mismatching and result.registers_written:
            self._mismatching = False
            log.info("device %s: writes read back correctly again", self.id)

    def outcome(self, status: WriteStatus, error: str = "") -> WriteOutcome:
        """This cycle's write outcome with the unit's write history."""
        return WriteOutcome(
            status=status,
            power_w=self.written.power_w if self.written is not None else None,
            accepted_at_mono=self.accepted_at_mono,
            error=error,
            consecutive_failures=self.write_failures,
        )

    def _write_failed(self, exc: BaseException) -> WriteOutcome:
        self._deadlines += isinstance(exc, TimeoutError)
        self.write_failures += 1
        self.last_write_error = f"{_error_kind(exc)}: {exc}" if str(exc) else _error_kind(exc)
        if self.write_failures == 1:
            log.warning("device %s: write failed: %s", self.id, self.last_write_error)
        if self.write_failures >= WRITE_FAILED_AFTER and self.state in (
            DeviceState.RUNNING,
            DeviceState.WRITE_FAILED,
        ):
            self._transition(
                DeviceState.WRITE_FAILED,
                f"{self.write_failures} writes in a row failed: {self.last_write_error}",
            )
        return self.outcome(WriteStatus.FAILED, self.last_write_error)

    def _write_accepted(self) -> None:
        if self.write_failures:
            log.info("device %s: writes accepted again", self.id)
        self.write_failures = 0
        self.last_write_error = ""
        self.accepted_at_mono = self._clock.monotonic()

    async def apply(self, setpoint: Setpoint, *, refresh_slot: bool = False) -> WriteOutcome:
        """Write ``setpoint`` if it changed or a refresh is due; never raises.

        A refresh is due when :meth:`refresh_interval_s` has passed since the last write, or
        earlier in the unit's ``refresh_slot`` (essd.cycle.write spreads the units' refreshes
        over the cycles). The outcome says whether a write was accepted (WRITTEN), nothing was
        due (HELD) or the write failed (FAILED, with the error); ``accepted_at_mono`` always
        dates the last accepted write, so the setpoint's age grows while writes fail.
        """
        now = self._clock.monotonic()
        interval = self.refresh_interval_s()

        def due_since(at: float | None) -> bool:
            return at is None or now - at >= interval or (refresh_slot and now > at)

        due = due_since(self._written_at)
        changed = self.written is None or abs(self.written.power_w - setpoint.power_w) >= (
            WRITE_DEADBAND_W
        )
        if setpoint.power_w == 0.0 and self.written is not None and self.written.power_w != 0.0:
            changed = True  # always honour a return to idle
        try:
            if self.state is DeviceState.RUNNING:
                await self._setup()
            hb = self.driver.capability(HeartbeatControl)
            if hb is not None and due_since(self._heartbeat_at):
                self._count(await hb.heartbeat())
                self._heartbeat_at = now
            if not (changed or due) and not self.write_failures:
                return self.outcome(WriteStatus.HELD)
            if (power := self.driver.capability(ActivePowerControl)) is not None:
                result = await power.set_active_power(setpoint.power_w, duration_s=setpoint.ttl_s)
            elif (charge := self.driver.capability(ChargeLimitControl)) is not None:
                result = await charge.set_charge_limit(max(0.0, -setpoint.power_w))
            else:
                return self.outcome(WriteStatus.HELD)
        except (DeviceError, TimeoutError, OSError) as exc:
            return self._write_failed(exc)
        self._count(result)
        self.written = setpoint
        self._written_at = now
        self.safe_written = False  # 0 W is not the device's safe mode: that is written apart
        self._write_accepted()
        return self.outcome(WriteStatus.WRITTEN)

    async def enter_safe_mode(self) -> bool:
        """Write the device's own safe mode (or 0 W); True when the device acknowledged it.

        A safe mode whose read-back differs from what was written is not safe: the unit goes
        to FAULT ("safe mode not confirmed by read-back") and the write is tried again.
        """
        try:
            if (safe := self.driver.capability(SafeModeControl)) is not None:
                result = await safe.safe_mode()
            elif (power := self.driver.capability(ActivePowerControl)) is not None:
                result = await power.set_active_power(0.0, duration_s=self.ttl_s)
            elif (charge := self.driver.capability(ChargeLimitControl)) is not None:
                result = await charge.set_charge_limit(0.0)
            else:
                return True
        except (DeviceError, TimeoutError, OSError) as exc:
            self._write_failed(exc)
            return False
        self._count(result)
        if not result.ok:
            self.safe_mode_unconfirmed = True
            self._transition(DeviceState.FAULT, "safe mode not confirmed by read-back")
            return False
        self.safe_mode_unconfirmed = False
        self._write_accepted()
        self.safe_written = True
        self.written = None
        return True

    def frozen_counters(self) -> DeviceCounters:
        """Counters for the published event: the driver's own Modbus counters (requests,
        errors by kind, writes, read-back mismatches, latency) and the whole-read deadlines
        counted here."""
        wire = self.driver.counters()
        if not self._deadlines:
            return wire
        errors = {**wire.errors_total}
        errors["read_deadline"] = errors.get("read_deadline", 0) + self._deadlines
        return replace(wire, errors_total=errors)


def _stale(r: Reading) -> Reading:
    return Reading(r.value, r.unit, r.read_at_mono, Quality.STALE, "device not answering")
