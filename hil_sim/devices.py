"""Simulated devices: register stores laid out from the very profiles the drivers read.

Each device is a :class:`drivers.registers.RegisterStore` that :class:`drivers.modbus.ModbusServer`
serves. Its register map comes from :class:`drivers.layout.ProfileImage` (plain profiles) or
:func:`drivers.sunspec.build_sunspec_image` (SunSpec profiles), so the driver and the simulator
cannot drift apart. Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid
W > 0 imports.

What a storage device does is read from the profile, not from code:

- **Commands** are inferred from the registers through the profile's ``set_active_power``
  action: the branch (``charge``/``discharge``/``idle``) whose literal writes all match the
  registers is the mode the device is in, and its ``param`` registers give the power
  (``power_w`` signed, ``charge_w``/``discharge_w``/``abs_w`` magnitudes). When no branch
  matches, the device is in its own mode (modelled as 0 W).
- **Revert timers**: a command expires ``duration_s`` after it was written when the branch
  carries one (a forcible-charge period), else after the ``configure_revert_timer`` ``seconds``
  register (when its literal writes match, i.e. the timer is enabled), else after the
  profile's ``behaviour.setpoint_timeout_s``; any write to a register of ``set_active_power``
  refreshes it. On expiry the device performs its ``safe_mode`` writes itself.
- **Heartbeat**: once the ``heartbeat`` register has changed, the device expects it to change
  again within ``behaviour.heartbeat_timeout_s``, else it goes to safe mode.
- **Limits**: ``set_charge_limit`` / ``set_discharge_limit`` registers cap the power,
  ``set_soc_limits`` registers are the unit's own SoC window, ``enable_output`` /
  ``disable_output`` literals say whether the outputs are on.
- **Write validation**: a write that leaves a profile register outside its ``min``/``max``
  (or at a "not implemented" marker) is undone and answered with Modbus exception 3.
- **Readings** (SoC, power, live limits, alarms...) are published into the registers each time
  the device is read, from the battery model advanced to that instant.

Where a profile's mode semantics need more than its actions say, a small per-class behaviour
adds it (selected from the profile's content, not its name): SunSpec 704/802 (revert to
``WSetRvrt``, ``WSetRvrtRem`` count-down, 802 state and events, battery heartbeat), the
Victron-style ESS setpoint (``/Mode``, ``DisableCharge``/``DisableFeedIn``, AC-in/out, state),
the Huawei-style forcible charge (running status), and portable units (charge from the site while
plugged in, outputs feeding the campers while away).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from drivers.layout import ProfileImage, from_base, to_base
from drivers.profile import ActionName, Profile, RegisterSpec, WriteStep
from drivers.registers import (
    EncodeError,
    ModbusExceptionCode,
    NoResponse,
    RegisterAccessError,
    Table,
)
from drivers.sunspec import SunSpecError, SunSpecImage, build_sunspec_image
from essd.clock import Clock
from essd.domain import DeviceClass
from hil_sim.battery import Alarm, Battery, BatteryParams, BatteryState

__all__ = [
    "DeviceFaults",
    "MeterDevice",
    "RegisterMap",
    "SimDevice",
    "StorageDevice",
    "build_image",
    "build_storage_device",
]

log = logging.getLogger(__name__)

_SENSES = ("charge", "discharge", "idle")


class RegisterMap(Protocol):
    """What :class:`ProfileImage` and :class:`SunSpecImage` share: named physical access."""

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """RegisterStore read."""
        ...

    def write(self, address: int, values: Sequence[int]) -> None:
        """RegisterStore write (a client's)."""
        ...

    def spec(self, name: str) -> RegisterSpec:
        """The profile register called ``name``."""
        ...

    def names(self) -> Iterable[str]:
        """Every register name of the profile."""
        ...

    def get_value(self, name: str) -> float | str | None:
        """A register in the profile's units (None when invalid / not implemented)."""
        ...

    def set_value(self, name: str, value: float | str, *, check_range: bool = True) -> None:
        """Set a register in the profile's units."""
        ...

    def add_write_listener(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Hear which registers (or SunSpec points) a client write touched."""
        ...


def build_image(profile: Profile, *, unit: int | None = None) -> ProfileImage | SunSpecImage:
    """The register map of ``profile``, laid out by the drivers' own code."""
    if profile.driver == "sunspec":
        return build_sunspec_image(profile, unit=unit)
    return ProfileImage(profile)


@dataclass
class DeviceFaults:
    """Faults a device is under right now (the fault timeline switches them)."""

    no_answer: bool = False  # silence: the client times out (dead device, meter loss)
    exception_code: ModbusExceptionCode | None = None  # every request answers this exception
    frozen: bool = False  # measurements stop updating (a stuck gateway cache)
    ignore_writes: bool = False  # writes acknowledged but not applied
    unplugged: bool = False  # a portable unit away from the site: no answer, no exchange
    away_use_w: float = 0.0  # what the campers draw from an unplugged unit's outputs
    reading_w: float | None = None  # a meter reports this instead of the truth (a glitch)
    drift_w_per_s: float = 0.0  # a meter's reading leaves the truth at this rate...
    drift_since: float | None = None  # ...since this epoch s
    ignore_safe_mode: bool = False  # writes that would take the safe mode are acknowledged only


class SimDevice:
    """Base of every simulated device: a RegisterStore with faults and lazy updates."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        image: ProfileImage | SunSpecImage,
        clock: Clock,
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.image: ProfileImage | SunSpecImage = image
        self.clock = clock
        self.faults = DeviceFaults()
        self._fresh_at: float | None = None  # simulated time the registers were last published
        self._point_names = {r.point: r.name for r in profile.registers if r.point is not None}
        self._touched: list[str] = []
        self._publish_errors: set[str] = set()
        image.add_write_listener(self._heard)

    # -- RegisterStore -------------------------------------------------------------------------

    def _gate(self) -> None:
        f = self.faults
        if f.no_answer or f.unplugged:
            raise NoResponse
        if f.exception_code is not None:
            raise RegisterAccessError(f.exception_code, "injected exception response")

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Advance the device to now, publish its readings, answer from the registers.

        Like a real unit, which refreshes its registers periodically rather than per request,
        readings are published at most every ``PUBLISH_INTERVAL_S`` of simulated time (writes
        and faults publish at once), so the several block requests of one read see one state.
        """
        self._gate()
        now = self.clock.now()
        if self._fresh_at is None or not 0.0 <= now - self._fresh_at < PUBLISH_INTERVAL_S:
            self.update()
            self._fresh_at = now
        return self.image.read(table, address, count)

    def invalidate(self) -> None:
        """Publish again on the next read even at the same instant (a fault changed)."""
        self._fresh_at = None

    def write(self, address: int, values: Sequence[int]) -> None:
        """Validate and apply a client's write, then act on it."""
        self._gate()
        self.update()
        old = self.image.read(Table.HOLDING, address, len(values))  # address errors answer
        if self.faults.ignore_writes:
            return
        self._touched = []
        self.image.write(address, values)
        names = list(dict.fromkeys(self._touched))
        if self.faults.ignore_safe_mode and self.refuses_as_safe_mode(names):
            self._touched = []
            self.image.write(address, old)  # acknowledged, not taken: read-back shows it
            return
        bad = next((n for n in names if not self._in_range(n)), None)
        if bad is not None:
            self._touched = []
            self.image.write(address, old)  # undo: a refused write changes nothing
            spec = self.profile.register(bad)
            raise RegisterAccessError(
                ModbusExceptionCode.ILLEGAL_DATA_VALUE,
                f"{bad}: outside [{spec.min}, {spec.max}]",
            )
        self.on_write(names)

    def _heard(self, names: tuple[str, ...]) -> None:
        for n in names:
            self._touched.append(self._point_names.get(n, n))

    def _in_range(self, name: str) -> bool:
        try:
            spec = self.profile.register(name)
        except KeyError:
            return True  # a SunSpec point the profile does not map: the model's own rules
        value = self.image.get_value(name)
        if value is None:
            return False  # out of range (plain decode) or a "not implemented" marker
        if isinstance(value, str):
            return True
        return (spec.min is None or value >= spec.min - 1e-9) and (
            spec.max is None or value <= spec.max + 1e-9
        )

    # -- hooks ---------------------------------------------------------------------------------

    def update(self) -> None:
        """Advance to the clock's now and publish readings (unless frozen)."""

    def on_write(self, names: list[str]) -> None:
        """React to a client write of the registers ``names``."""

    def refuses_as_safe_mode(self, names: list[str]) -> bool:
        """Under ``safe_mode_ignored``: True when the write just made put one of the safe
        mode's mode registers (a literal, not a power value) at its safe-mode value."""
        act = self.profile.actions.get(ActionName.SAFE_MODE)
        if act is None:
            return False
        power = self.profile.actions.get(ActionName.SET_ACTIVE_POWER)
        params = {s.register for s in power.writes if s.param is not None} if power else set()
        return any(
            s.value is not None
            and s.register in names
            and s.register not in params
            and self.matches(s)
            for s in act.writes
        )

    # -- register helpers ----------------------------------------------------------------------

    def value(self, name: str) -> float | str | None:
        """A register in the profile's units."""
        return self.image.get_value(name)

    def base_value(self, name: str) -> float | None:
        """A numeric register in essd base units (W, s, ratio), None when invalid."""
        v = self.image.get_value(name)
        if not isinstance(v, float | int):
            return None
        return to_base(float(v), self.profile.register(name).unit)

    def put(self, name: str, value: float | str) -> None:
        """Set a register (profile units), no range check; unrepresentable values are skipped.

        The simulator publishes what the physics says, even outside the register's declared
        range (the driver then reports it invalid, as with a real device).
        """
        try:
            self.image.set_value(name, value, check_range=False)
        except (EncodeError, ValueError, KeyError) as exc:
            if name not in self._publish_errors:  # log once per register, not per read
                self._publish_errors.add(name)
                log.warning("%s: cannot publish %s=%r: %s", self.device_id, name, value, exc)

    def put_base(self, name: str, value: float) -> None:
        """Set a numeric register from a value in essd base units."""
        self.put(name, from_base(value, self.profile.register(name).unit))

    def put_field(self, field: str, value: float) -> None:
        """Set a semantic field (base units) when the profile maps it."""
        reg = self.profile.fields.get(field)
        if reg is not None:
            self.put_base(reg, value)

    def literal(self, step: WriteStep) -> float | str:
        """A step's literal in the register's numeric terms (SunSpec symbols resolved)."""
        assert step.value is not None
        want = step.value
        if isinstance(want, str) and isinstance(self.image, SunSpecImage):
            spec = self.profile.register(step.register)
            if spec.point is not None:
                _, pdef, _ = self.image.map.locate(spec.point)
                if want in pdef.symbols:
                    return float(pdef.symbols[want])
        return want

    def matches(self, step: WriteStep) -> bool:
        """True when the register holds the step's literal value."""
        want = self.literal(step)
        cur = self.image.get_value(step.register)
        if isinstance(want, str) or isinstance(cur, str) or cur is None:
            return cur == want
        spec = self.profile.register(step.register)
        tolerance = max(abs(spec.scale) * 0.51, abs(want) * 1e-6, 1e-9)
        return abs(float(cur) - float(want)) <= tolerance

    def apply_literals(self, action: ActionName) -> bool:
        """Perform an action's literal writes as the device itself (no client involved)."""
        act = self.profile.actions.get(action)
        if act is None:
            return False
        for step in act.writes:
            if step.value is not None:
                self.put(step.register, self.literal(step))
        return True

    def param_register(self, action: ActionName, param: str) -> str | None:
        """The register an action writes ``param`` into, if any."""
        act = self.profile.actions.get(action)
        if act is None:
            return None
        return next((s.register for s in act.writes if s.param == param), None)


# -- storage devices ---------------------------------------------------------------------------


class StorageDevice(SimDevice):
    """A battery unit (industrial, household or portable) driven through its profile."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        image: ProfileImage | SunSpecImage,
        clock: Clock,
        battery: Battery,
    ) -> None:
        super().__init__(device_id=device_id, profile=profile, image=image, clock=clock)
        self.battery = battery
        act = profile.actions.get(ActionName.SET_ACTIVE_POWER)
        self._power_regs = {s.register for s in act.writes} if act else set()
        hb = self.param_register(ActionName.HEARTBEAT, "counter")
        self._hb_reg = hb
        self._refreshed_at: float | None = None  # epoch s of the last setpoint write
        self._hb_at: float | None = None  # epoch s of the last heartbeat change
        self._hb_value: float | str | None = None
        self.reverts = 0  # how many times a revert timer or heartbeat loss fired
        self._dirty = True
        self.init_registers()
        self._hb_value = self.value(hb) if hb else None
        self.update()

    # -- set-up --------------------------------------------------------------------------------

    def _set_clipped(self, name: str | None, base: float) -> None:
        if name is None:
            return
        spec = self.profile.register(name)
        v = from_base(base, spec.unit)
        if spec.min is not None:
            v = max(v, spec.min)
        if spec.max is not None:
            v = min(v, spec.max)
        self.put(name, v)

    def init_registers(self) -> None:
        """Power-on values of the control registers: full limits, full window, own mode."""
        p = self.profile
        self._set_clipped(self.param_register(ActionName.SET_CHARGE_LIMIT, "charge_w"), 1e12)
        self._set_clipped(self.param_register(ActionName.SET_DISCHARGE_LIMIT, "discharge_w"), 1e12)
        self._set_clipped(self.param_register(ActionName.SET_SOC_LIMITS, "min_soc"), 0.0)
        self._set_clipped(self.param_register(ActionName.SET_SOC_LIMITS, "max_soc"), 1.0)
        self.apply_literals(ActionName.ENABLE_OUTPUT)
        self.apply_literals(ActionName.SAFE_MODE)
        for field in ("capacity_wh", "rated_capacity_wh"):
            self.put_field(field, self.battery.params.capacity_wh)
        # Any other writable register outside its range starts at its lower bound, so that
        # reading back an untouched register never gives an invalid value.
        for spec in p.registers:
            if spec.access != "r" and not self._in_range(spec.name) and spec.min is not None:
                self.put(spec.name, spec.min)

    # -- command interpretation ----------------------------------------------------------------

    def _branch(self) -> tuple[str, list[WriteStep]] | None:
        """The set_active_power branch the registers are in, or None (the device's own mode)."""
        act = self.profile.actions.get(ActionName.SET_ACTIVE_POWER)
        if act is None:
            return None
        found: list[tuple[int, str, list[WriteStep]]] = []
        for sense in _SENSES:
            steps = [s for s in act.writes if s.when in ("always", sense)]
            literals = [s for s in steps if s.value is not None]
            if all(self.matches(s) for s in literals):
                found.append((sum(s.when == sense for s in literals), sense, steps))
        if not found:
            return None
        best = max(f[0] for f in found)
        candidates = [(sense, steps) for n, sense, steps in found if n == best]
        if len(candidates) == 1:
            return candidates[0]
        # Several branches match equally (no sense-specific literals): the sign decides.
        power = self._power_of("always", candidates[0][1])
        sense = "charge" if power < 0 else "discharge" if power > 0 else "idle"
        return next((c for c in candidates if c[0] == sense), candidates[0])

    def _power_of(self, sense: str, steps: list[WriteStep]) -> float:
        if sense == "idle" and not any(s.param == "power_w" for s in steps):
            return 0.0  # the idle branch's magnitudes are left-overs, not a command
        power = 0.0
        for s in steps:
            if s.param is None:
                continue
            v = self.base_value(s.register)
            if v is None:
                continue
            if s.param == "power_w":
                power = v
            elif s.param == "charge_w":
                power = -abs(v)
            elif s.param == "discharge_w":
                power = abs(v)
            elif s.param == "abs_w":
                power = -abs(v) if sense == "charge" else abs(v)
        return power

    def commanded_power(self) -> float:
        """The power the registers command now (battery sign), before the unit's limits."""
        branch = self._branch()
        if branch is None:
            return 0.0
        sense, steps = branch
        return self._power_of(sense, steps)

    def under_external_control(self) -> bool:
        """True while the registers hold a set_active_power command."""
        return self._branch() is not None

    def caps(self) -> tuple[float | None, float | None]:
        """Charge and discharge caps (W) from the limit registers; None = no cap."""
        out: list[float | None] = []
        for action, param in (
            (ActionName.SET_CHARGE_LIMIT, "charge_w"),
            (ActionName.SET_DISCHARGE_LIMIT, "discharge_w"),
        ):
            reg = self.param_register(action, param)
            out.append(None if reg is None else max(0.0, self.base_value(reg) or 0.0))
        return out[0], out[1]

    def soc_window(self) -> tuple[float, float]:
        """The unit's own SoC window from its SoC-limit registers (0..1 when it has none)."""
        lo_reg = self.param_register(ActionName.SET_SOC_LIMITS, "min_soc")
        hi_reg = self.param_register(ActionName.SET_SOC_LIMITS, "max_soc")
        lo = (self.base_value(lo_reg) if lo_reg else None) or 0.0
        hi = self.base_value(hi_reg) if hi_reg else None
        hi = 1.0 if hi is None else hi
        lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
        return (lo, hi) if lo <= hi else (hi, hi)

    def outputs_enabled(self) -> bool:
        """True when any enable_output register holds its enable value (True without one)."""
        act = self.profile.actions.get(ActionName.ENABLE_OUTPUT)
        if act is None:
            return True
        return any(self.matches(s) for s in act.writes if s.value is not None)

    # -- timers --------------------------------------------------------------------------------

    def revert_after_s(self) -> float | None:
        """Seconds a command lasts without a refresh (None: held until changed)."""
        branch = self._branch()
        if branch is not None:
            for s in branch[1]:
                if s.param == "duration_s":
                    v = self.base_value(s.register)
                    return v if v is not None and v > 0 else None
        configure = self.profile.actions.get(ActionName.CONFIGURE_REVERT_TIMER)
        if configure is not None:
            enabled = all(self.matches(s) for s in configure.writes if s.value is not None)
            reg = next((s.register for s in configure.writes if s.param == "seconds"), None)
            seconds = self.base_value(reg) if reg else None
            if enabled and seconds is not None and seconds > 0:
                return seconds
        return self.profile.behaviour.setpoint_timeout_s

    def revert_deadline(self) -> float | None:
        """Epoch s at which the current command reverts, None when none is pending."""
        if self._refreshed_at is None:
            return None
        after = self.revert_after_s()
        return None if after is None else self._refreshed_at + after

    def heartbeat_deadline(self) -> float | None:
        """Epoch s at which a missing heartbeat sends the device to safe mode."""
        timeout = self.profile.behaviour.heartbeat_timeout_s
        if self._hb_at is None or timeout is None:
            return None
        return self._hb_at + timeout

    def revert(self, at: float, reason: str) -> None:
        """The device's own reaction to a command that was not refreshed: its safe mode."""
        del at
        self.apply_literals(ActionName.SAFE_MODE)
        log.info("%s: %s: back to its own safe mode", self.device_id, reason)

    def reset_mode(self, *, at: float | None = None) -> None:
        """Drop the commanded mode at ``at`` (default now), as after a restart."""
        self.battery.advance(at)
        self.apply_literals(ActionName.SAFE_MODE)
        self._refreshed_at = None
        self._hb_at = None
        self._command(at)
        self.update()

    # -- the update cycle ----------------------------------------------------------------------

    def on_write(self, names: list[str]) -> None:
        """Refresh timers from the registers written, then act on the new state."""
        now = self.clock.now()
        if self._power_regs.intersection(names):
            self._refreshed_at = now
        if self._hb_reg is not None and self._hb_reg in names:
            v = self.value(self._hb_reg)
            if v != self._hb_value:
                self._hb_value = v
                self._hb_at = now
        self._dirty = True
        self.update()

    def update(self) -> None:
        """Fire due timers in order, command the battery, publish readings."""
        now = self.clock.now()
        while True:
            events = [
                (t, kind)
                for t, kind in (
                    (self.revert_deadline(), "revert timer expired"),
                    (self.heartbeat_deadline(), "heartbeat lost"),
                )
                if t is not None and t <= now
            ]
            if not events:
                break
            at, kind = min(events)
            self.battery.advance(at)
            if kind == "heartbeat lost":
                self._hb_at = None
            self._refreshed_at = None
            if kind == "heartbeat lost" or self.commanded_power() != 0.0:
                # An idle command that expires changes nothing; only real reverts count.
                self.reverts += 1
                self.revert(at, kind)
                self._command(at)
        if self._dirty:
            self._command(None)
        if not self.faults.frozen:
            self.publish(self.battery.state())

    def _command(self, at: float | None) -> None:
        self._dirty = False
        charge_cap, discharge_cap = self.caps()
        self.battery.advance(at)
        self.battery.set_power_caps(charge_w=charge_cap, discharge_w=discharge_cap, at=at)
        self.battery.set_soc_window(*self.soc_window(), at=at)
        self.battery.command(self.commanded_power(), at=at)

    def set_bms_fault(self, active: bool, *, at: float | None = None) -> None:
        """Inject or clear an over-temperature BMS fault from ``at`` (default now)."""
        self.battery.set_forced_fault(active, at=at)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, s: BatteryState) -> None:
        """Readings into the registers: SoC, power, live limits, capacity, alarms."""
        self.put_field("soc", s.soc)
        self.publish_power(s.power_w)
        self.put_field("max_charge_w", s.limits.max_charge_w)
        self.put_field("max_discharge_w", s.limits.max_discharge_w)
        tripped = Alarm.OVER_TEMPERATURE in s.alarms
        for field in self.profile.fields:
            if field.startswith(("alarm", "fault")) and not self._is_bitfield(field):
                self.put_field(field, 1.0 if tripped else 0.0)

    def _is_bitfield(self, field: str) -> bool:
        return isinstance(self.image, SunSpecImage) and self.profile.fields[field] in (
            self._sunspec_bitfields()
        )

    def _sunspec_bitfields(self) -> set[str]:
        return set()

    def publish_power(self, power_w: float) -> None:
        """Battery power into ``power_w``, or split over the fields of a derived power."""
        if "power_w" in self.profile.fields:
            self.put_field("power_w", power_w)
            return
        terms = self.profile.derived.get("power_w")
        if not terms:
            return
        chosen = next((f for f, k in terms.items() if k * power_w > 0), None)
        for f, k in terms.items():
            self.put_field(f, power_w / k if f == chosen else 0.0)

    def true_state(self) -> BatteryState:
        """The battery's true state now (advancing the device first)."""
        self.update()
        return self.battery.state()


class SunSpecStorageDevice(StorageDevice):
    """SunSpec PCS + BMS: 704 reversion to WSetRvrt, 802 state, events and heartbeat, 713."""

    def init_registers(self) -> None:
        """Power-on: the generic values, then a revert time that is in range but disabled."""
        super().init_registers()
        timeout = self.profile.behaviour.setpoint_timeout_s or 60.0
        if self._has_point("704.WSetRvrtTms"):
            self.image_ss.set_point("704.WSetRvrtTms", timeout)
        if self._has_point("713.SoH"):
            self.image_ss.set_point("713.SoH", 100)

    @property
    def image_ss(self) -> SunSpecImage:
        """The image as a SunSpec image."""
        assert isinstance(self.image, SunSpecImage)
        return self.image

    def _has_point(self, ref: str) -> bool:
        known = self.__dict__.setdefault("_known_points", {})
        if ref not in known:
            try:
                self.image_ss.map.locate(ref)
                known[ref] = True
            except SunSpecError:  # the model is not in this profile
                known[ref] = False
        return bool(known[ref])

    def _sunspec_bitfields(self) -> set[str]:
        return {r.name for r in self.profile.registers if r.point in ("802.Evt1", "802.Evt2")}

    def revert(self, at: float, reason: str) -> None:
        """704: on expiry an enabled revert holds WSetRvrt; a lost heartbeat is safe mode."""
        img = self.image_ss
        if (
            reason == "revert timer expired"
            and self._has_point("704.WSetEnaRvrt")
            and img.get_point("704.WSetEnaRvrt") == 1
        ):
            img.set_point("704.WSet", img.get_point("704.WSetRvrt") or 0)
            log.info("%s: %s: holding WSetRvrt", self.device_id, reason)
            return
        super().revert(at, reason)

    def publish(self, s: BatteryState) -> None:
        """Generic readings plus 802 V/A/state/events/Hb, 713 energy, 704 remaining time."""
        super().publish(s)
        img = self.image_ss
        volts = 700.0 + 100.0 * s.soc  # a LFP string's voltage rises with SoC
        self.put_field("dc_voltage_v", volts)
        self.put_field("max_charge_a", s.limits.max_charge_w / volts)
        self.put_field("max_discharge_a", s.limits.max_discharge_w / volts)
        tripped = Alarm.OVER_TEMPERATURE in s.alarms
        if self._has_point("802.State"):
            img.set_point("802.State", 99 if tripped else 3)  # FAULT / CONNECTED
        if self._has_point("802.Evt1"):
            img.set_point("802.Evt1", 1 << 1 if tripped else 0)  # bit 1: OVER_TEMP_ALARM
        if self._has_point("802.Hb"):
            img.set_point("802.Hb", int(s.time) % 0xFFFF)
        for ref in ("713.SoC",):
            if self._has_point(ref):
                img.set_point(ref, round(s.soc * 100.0, 2))
        if self._has_point("713.WHAvail"):
            img.set_point("713.WHAvail", round(s.energy_wh))
        if self._has_point("713.WHRtg"):
            img.set_point("713.WHRtg", round(self.battery.params.capacity_wh))
        if self._has_point("704.WSetRvrtRem"):
            deadline = self.revert_deadline()
            remaining = 0.0 if deadline is None else max(0.0, deadline - self.clock.now())
            img.set_point("704.WSetRvrtRem", math.ceil(remaining))


class EssSetpointDevice(StorageDevice):
    """Victron-style ESS external control: AC setpoint held while refreshed, /Mode and flags."""

    def init_registers(self) -> None:
        """Power-on: the generic values and /Mode "on"."""
        super().init_registers()
        if self._reg_by_vendor("/Mode"):
            self.put(self._reg_by_vendor("/Mode") or "", 3)

    def _reg_by_vendor(self, vendor: str) -> str | None:
        return next((r.name for r in self.profile.registers if r.vendor_name == vendor), None)

    def _flag(self, vendor: str) -> bool:
        reg = self._reg_by_vendor(vendor)
        return reg is not None and (self.base_value(reg) or 0.0) >= 0.5

    def caps(self) -> tuple[float | None, float | None]:
        """DisableCharge / DisableFeedIn and /Mode (1 charger only, 2 inverter only, 4 off)."""
        charge, discharge = super().caps()
        mode_reg = self._reg_by_vendor("/Mode")
        mode = self.base_value(mode_reg) if mode_reg else 3.0
        if self._flag("/Hub4/DisableCharge") or mode in (2.0, 4.0):
            charge = 0.0
        if self._flag("/Hub4/DisableFeedIn") or mode in (1.0, 4.0):
            discharge = 0.0
        return charge, discharge

    def commanded_power(self) -> float:
        """The setpoint is a power, whatever the flags (they act as caps)."""
        reg = self.param_register(ActionName.SET_ACTIVE_POWER, "power_w")
        return (self.base_value(reg) or 0.0) if reg else 0.0

    def publish_power(self, power_w: float) -> None:
        """No loads on AC-out: AC-in carries the battery power (> 0 from the grid)."""
        self.put_field("ac_output_w", 0.0)
        self.put_field("ac_input_w", -power_w)

    def publish(self, s: BatteryState) -> None:
        """Generic readings plus /State: 252 external control, 9 inverting, 3 bulk, 2 fault."""
        super().publish(s)
        reg = self._reg_by_vendor("/State")
        if reg is None:
            return
        if Alarm.OVER_TEMPERATURE in s.alarms:
            state = 2.0
        elif self._refreshed_at is not None:
            state = 252.0
        elif s.power_w > 0:
            state = 9.0
        elif s.power_w < 0:
            state = 3.0
        else:
            state = 1.0
        self.put(reg, state)


class ForcibleDevice(StorageDevice):
    """Huawei-style forcible charge/discharge: generic semantics plus the running status."""

    def publish(self, s: BatteryState) -> None:
        """Running status: 3 fault, 2 running, 1 standby."""
        super().publish(s)
        running = 2.0 if abs(s.power_w) > 0 else 1.0
        self.put_field("running_status", 3.0 if Alarm.OVER_TEMPERATURE in s.alarms else running)


class PortableDevice(StorageDevice):
    """A portable power station: no power setpoint.

    Plugged in, it charges from the site at its AC charge-rate limit (battery power < 0) and
    passes the site's power through to its outlets; unplugged (a fault on the timeline), it
    answers nothing, exchanges nothing with the site, and its outputs (when enabled) feed the
    campers' ``away_use_w`` from the battery.
    """

    def commanded_power(self) -> float:
        """Charge at the AC charge-rate limit while plugged in; the away use when not."""
        if self.faults.unplugged:
            return self.faults.away_use_w if self.outputs_enabled() else 0.0
        reg = self.param_register(ActionName.SET_CHARGE_LIMIT, "charge_w")
        return -(self.base_value(reg) or 0.0) if reg else 0.0

    def caps(self) -> tuple[float | None, float | None]:
        """No discharge into the site; outputs off deliver nothing while away either."""
        charge, _ = super().caps()
        if self.faults.unplugged:
            return 0.0, None if self.outputs_enabled() else 0.0
        return charge, 0.0

    def set_unplugged(
        self, unplugged: bool, away_use_w: float = 0.0, *, at: float | None = None
    ) -> None:
        """Take the unit away from the site (or bring it back) at ``at`` (default now)."""
        self._advance_only(at)
        self.faults.unplugged = unplugged
        self.faults.away_use_w = away_use_w
        self._dirty = True
        self._advance_only(at)

    def _advance_only(self, at: float | None = None) -> None:
        # While unplugged the store is silent, but the battery still moves (away use).
        if self._dirty:
            self._command(at)
        else:
            self.battery.advance(at)

    def site_power_w(self) -> float:
        """What the unit exchanges with the site (0 while away)."""
        self._advance_only()
        return 0.0 if self.faults.unplugged else self.battery.state().power_w

    def publish(self, s: BatteryState) -> None:
        """Generic readings plus the output switch states."""
        super().publish(s)
        for field in ("ac_output_on", "dc_output_on"):
            if field in self.profile.fields:
                self.put_field(field, self._switch_state(field))

    def _switch_state(self, field: str) -> float:
        # Each state register mirrors its control register (ac_output_on -> ac_output_on_state).
        act = self.profile.actions.get(ActionName.ENABLE_OUTPUT)
        state_reg = self.profile.fields[field]
        for step in act.writes if act else ():
            if step.value is not None and state_reg.startswith(step.register):
                return 1.0 if self.matches(step) else 0.0
        return 1.0 if self.outputs_enabled() else 0.0


# -- meter ---------------------------------------------------------------------------------------


# How often a simulated unit refreshes the readings in its registers (simulated seconds).
PUBLISH_INTERVAL_S = 0.1


def measurement_noise(t: float, amplitude_w: float) -> float:
    """Deterministic measurement noise in [-amplitude, amplitude] W (a hash of the time)."""
    x = math.sin(t * 12.9898 + 78.233) * 43758.5453
    return (2.0 * (x - math.floor(x)) - 1.0) * amplitude_w


class MeterDevice(SimDevice):
    """The grid meter at the connection point: grid = load - PV - sum(battery), > 0 imports."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        image: ProfileImage | SunSpecImage,
        clock: Clock,
        grid_power_w: Callable[[], float],
        noise_w: float = 3.0,
        noise_ratio: float = 0.001,
    ) -> None:
        super().__init__(device_id=device_id, profile=profile, image=image, clock=clock)
        self._grid = grid_power_w
        self.noise_w = noise_w
        self.noise_ratio = noise_ratio
        self._t = clock.now()
        self._last_w = 0.0
        self.imported_wh = 0.0
        self.exported_wh = 0.0
        self.update()

    def update(self) -> None:
        """Integrate the energy counters, then publish power, phases, frequency, energy."""
        now = self.clock.now()
        grid = self._grid()
        dt_h = max(0.0, now - self._t) / 3600.0
        # Piecewise-constant between readings: the counters are for display and plausibility.
        self.imported_wh += max(self._last_w, 0.0) * dt_h
        self.exported_wh += max(-self._last_w, 0.0) * dt_h
        self._t, self._last_w = now, grid
        if self.faults.frozen:
            return
        # A real meter wobbles by a few watts (class 1: about 0.1 % plus a floor); an exact one
        # would read one constant value at a zero-export limit, which essd rightly takes for
        # frozen registers. The site's truth stays exact.
        measured = grid + measurement_noise(now, self.noise_w + self.noise_ratio * abs(grid))
        f = self.faults
        if f.reading_w is not None:  # a glitch: a wrong value, wobbling as a real reading does
            measured = f.reading_w + (measured - grid)
        elif f.drift_since is not None:
            measured += f.drift_w_per_s * max(0.0, now - f.drift_since)
        self.put_field("grid_power_w", measured)
        for phase in ("grid_l1_w", "grid_l2_w", "grid_l3_w"):
            self.put_field(phase, measured / 3.0)
        self.put_field("frequency_hz", 50.0)
        for field in ("imported_wh", "import_energy_wh"):  # plain and SunSpec profiles' names
            self.put_field(field, self.imported_wh)
        for field in ("exported_wh", "export_energy_wh"):
            self.put_field(field, self.exported_wh)


# -- factory -------------------------------------------------------------------------------------


def _has_vendor(profile: Profile, prefix: str) -> bool:
    return any(r.vendor_name.startswith(prefix) for r in profile.registers)


def build_storage_device(
    *,
    device_id: str,
    profile: Profile,
    clock: Clock,
    unit: int | None = None,
    initial_soc: float | None = None,
    capacity_wh: float | None = None,
    max_charge_w: float | None = None,
    max_discharge_w: float | None = None,
) -> StorageDevice:
    """A simulated storage unit of ``profile``, with the behaviour its profile calls for.

    The overrides come from the site (a site config's capacity) or a scenario (initial SoC).
    """
    if profile.device_class is DeviceClass.METER:
        raise ValueError(f"profile {profile.name}: a meter is not a storage unit")
    params = BatteryParams.from_profile(
        profile,
        capacity_wh=capacity_wh,
        max_charge_w=max_charge_w,
        max_discharge_w=max_discharge_w,
    )
    soc = profile.simulation.initial_soc if initial_soc is None else initial_soc
    battery = Battery(params, clock, initial_soc=soc)
    image = build_image(profile, unit=unit)
    cls: type[StorageDevice] = StorageDevice
    if profile.driver == "sunspec":
        cls = SunSpecStorageDevice
    elif profile.device_class is DeviceClass.PORTABLE:
        cls = PortableDevice
    elif _has_vendor(profile, "/Hub4/"):
        cls = EssSetpointDevice
    elif _has_vendor(profile, "[Energy storage] Forcible"):
        cls = ForcibleDevice
    return cls(device_id=device_id, profile=profile, image=image, clock=clock, battery=battery)
