"""A simulated storage unit: a battery model behind the registers of its profile.

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

Sign conventions: battery W > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

import logging
import math

from drivers.layout import base_unit, from_base
from drivers.profile import Action, ActionName, Profile, WriteStep
from drivers.profile_parts import Condition, Severity
from essd.clock import Clock
from hil_sim.battery import Alarm, Battery, BatteryState
from hil_sim.devices.base import SimDevice
from hil_sim.profile_image import ProfileImage
from hil_sim.sunspec_image import SunSpecImage

log = logging.getLogger(__name__)


_SENSES = ("charge", "discharge", "idle")


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
        self._gated = {g.target for g in profile.simulation.behaviour.gates}
        self._sense_steps: dict[int, list[tuple[str, list[WriteStep], list[WriteStep], int]]] = {}
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
        for name, value in p.simulation.behaviour.power_on.items():
            self.put(name, value)

    # -- command interpretation ----------------------------------------------------------------

    def _branch(self) -> tuple[str, list[WriteStep]] | None:
        """The set_active_power branch the registers are in, or None (the device's own mode)."""
        act = self.profile.actions.get(ActionName.SET_ACTIVE_POWER)
        if act is None:
            return None
        found: list[tuple[int, str, list[WriteStep]]] = []
        for sense, steps, literals, own in self._senses(act):
            if all(self.matches(s) for s in literals):
                found.append((own, sense, steps))
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

    def _senses(self, act: Action) -> list[tuple[str, list[WriteStep], list[WriteStep], int]]:
        """Per sense of ``act``: its steps, their literal steps (gated registers left out) and
        how many of those are the sense's own; worked out once per action."""
        known = self._sense_steps.get(id(act))
        if known is None:
            known = []
            for sense in _SENSES:
                steps = [s for s in act.writes if s.when in ("always", sense)]
                literals = [
                    s for s in steps if s.value is not None and s.register not in self._gated
                ]
                known.append((sense, steps, literals, sum(s.when == sense for s in literals)))
            self._sense_steps[id(act)] = known
        return known

    def step_base(self, step: WriteStep) -> float | None:
        """What a parameter step's register commands, in the parameter's base unit (W): the
        register's value, times the live ``divide_by`` field where the profile divides."""
        v = self.base_value(step.register)
        if v is None or step.divide_by is None:
            return v
        divisor = self.field_value(step.divide_by)
        return None if not divisor else v * divisor

    def _power_of(self, sense: str, steps: list[WriteStep]) -> float:
        if sense == "idle" and not any(s.param == "power_w" for s in steps):
            return 0.0  # the idle branch's magnitudes are left-overs, not a command
        power = 0.0
        for s in steps:
            if s.param is None:
                continue
            v = self.step_base(s)
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

    def caps(self) -> tuple[float | None, float | None]:
        """Charge and discharge caps (W) from the limit registers; None = no cap."""
        out: list[float | None] = []
        for action, param in (
            (ActionName.SET_CHARGE_LIMIT, "charge_w"),
            (ActionName.SET_DISCHARGE_LIMIT, "discharge_w"),
        ):
            act = self.profile.actions.get(action)
            step = next((s for s in act.writes if s.param == param), None) if act else None
            out.append(None if step is None else max(0.0, self.step_base(step) or 0.0))
        for gate in self.profile.simulation.behaviour.gates:
            value = self.value(gate.target)
            if value in gate.no_charge:
                out[0] = 0.0
            if value in gate.no_discharge:
                out[1] = 0.0
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
        self.publish_soc(s.soc)
        self.publish_power(s.power_w)
        self.put_field("max_charge_w", s.limits.max_charge_w)
        self.put_field("max_discharge_w", s.limits.max_discharge_w)
        self.publish_divisors()
        tripped = Alarm.OVER_TEMPERATURE in s.alarms
        mapped = self.publish_states(tripped)
        for field in self.profile.fields:
            legacy_alarm = field.startswith(("alarm", "fault")) and not self._is_bitfield(field)
            if legacy_alarm and self.profile.fields[field] not in mapped:
                self.put_field(field, 1.0 if tripped else 0.0)
        status = self.profile.simulation.behaviour.status
        if status is not None:
            if tripped:
                value = status.fault
            elif status.external_control is not None and self._refreshed_at is not None:
                value = status.external_control
            else:
                sign = (s.power_w > 0) - (s.power_w < 0)
                value = (status.charging, status.idle, status.discharging)[sign + 1]
            self.put(status.target, value)

    def publish_divisors(self) -> None:
        """Fields a write divides by: the DC bus voltage, or the rated power for a percentage."""
        for act in self.profile.actions.values():
            for step in act.writes:
                if step.divide_by is None:
                    continue
                spec = self.profile.register(self.profile.fields[step.divide_by])
                per_volt = base_unit(spec.unit) == "V"
                sim, rated = self.profile.simulation, self.profile.ratings
                self.put_field(
                    step.divide_by, sim.battery_voltage_v if per_volt else rated.max_charge_w
                )

    def publish_states(self, tripped: bool) -> set[str]:
        """State (``enum``) and alarm (``bits``) registers the device sets itself: the first
        listed normal state (or no bit) while healthy, the first listed fault while tripped.
        Registers an action writes or a derivation tests are left alone. Returns their names."""
        if not isinstance(self.image, ProfileImage):
            return set()
        tested = {
            self.profile.fields[c.field]
            for d in self.profile.derived.values()
            for c in d.conditions()
        }
        done: set[str] = set()
        for spec in self.profile.registers:
            if spec.access != "r" or spec.name in tested:
                continue
            if spec.enum is not None:
                wanted = Severity.FAULT if tripped else Severity.INFO
                raw = next((k for k, v in spec.enum.items() if v.severity is wanted), None)
                if raw is None and not tripped:
                    continue
                if raw is not None:
                    self.image.set_raw(spec.name, raw)
                done.add(spec.name)
            elif spec.bits is not None:
                fault_bit = next(
                    (b for b, v in spec.bits.items() if v.severity is Severity.FAULT), None
                )
                self.image.set_raw(
                    spec.name, 1 << fault_bit if tripped and fault_bit is not None else 0
                )
                done.add(spec.name)
        return done

    def _is_bitfield(self, field: str) -> bool:
        return isinstance(self.image, SunSpecImage) and self.profile.fields[field] in (
            self._sunspec_bitfields()
        )

    def _sunspec_bitfields(self) -> set[str]:
        return set()

    def publish_power(self, power_w: float) -> None:
        """Battery power into ``power_w``, or into the fields a derived power is made of."""
        stacks = self.profile.batteries
        total = sum(s.capacity_wh for s in stacks)
        for s in stacks:  # the inverter shares power between its batteries by capacity
            self.publish_derived(s.power_w, power_w * s.capacity_wh / total)
        if "power_w" in self.profile.fields or "power_w" in self.profile.derived:
            self.publish_derived("power_w", power_w)

    def publish_soc(self, soc: float) -> None:
        """SoC into ``soc`` and into each battery's SoC field (the batteries move together)."""
        for s in self.profile.batteries:
            self.publish_derived(s.soc, soc)
        self.publish_derived("soc", soc)

    def publish_derived(self, field: str, value: float) -> None:
        """Set the registers behind ``field`` (mapped or derived) so it reads ``value``."""
        if field in self.profile.fields:
            self.put_field(field, value)
            return
        d = self.profile.derived.get(field)
        if d is None:
            return
        value /= d.scale
        if d.sum is not None:
            through = (
                self.profile.simulation.behaviour.power_through if field == "power_w" else None
            )
            chosen = through or next((f for f, k in d.sum.items() if k * value > 0), None)
            for f, k in d.sum.items():
                self.publish_derived(f, value / k if f == chosen else 0.0)
        elif d.magnitude is not None and d.negative_when is not None:
            self.publish_derived(d.magnitude, abs(value))
            self.set_condition(d.negative_when, value < 0)
        elif d.product is not None:
            first, *rest = d.product
            held = [self.field_value(f) or 1.0 for f in rest]
            self.publish_derived(first, value / math.prod(held))
        elif d.select is not None:
            self.set_condition(d.select.when, True)
            self.publish_derived(d.select.then, value)

    def field_value(self, field: str) -> float | None:
        """A mapped field in base units, None when not mapped or not valid."""
        reg = self.profile.fields.get(field)
        return None if reg is None else self.base_value(reg)

    def set_condition(self, cond: Condition, holds: bool) -> None:
        """Set or clear the bit (or value) a condition tests in its field's register."""
        reg = self.profile.fields[cond.field]
        if not isinstance(self.image, ProfileImage):
            return
        raw = self.image.get_raw(reg)
        raw = raw if isinstance(raw, int) else 0
        if cond.bit is not None:
            raw = raw | (1 << cond.bit) if holds else raw & ~(1 << cond.bit)
        elif holds:
            raw = cond.equals or 0
        elif raw == cond.equals:
            raw = 0 if cond.equals != 0 else 1
        self.image.set_raw(reg, raw)

    def true_state(self) -> BatteryState:
        """The battery's true state now (advancing the device first, unless a read or a write
        already did at this instant: the meter asks every unit on each of its reads)."""
        self.advance_to_now()
        return self.battery.state()
