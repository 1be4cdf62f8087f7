"""The simulated models a profile declares in ``simulation.behaviour.model`` beyond plain
storage: SunSpec 704/802 (revert to ``WSetRvrt``, ``WSetRvrtRem`` count-down, 802 state and
events, battery heartbeat) and portable units (charge from the site while plugged in, outputs
feeding the campers while away); and the factory that builds the declared one. Gates, status
registers and power-on values are declared too and work for every model
(:mod:`hil_sim.devices.storage`). Sign conventions: battery W > 0 discharges into the site,
< 0 charges.
"""

from __future__ import annotations

import logging
import math

from drivers.profile import ActionName, Profile
from drivers.sunspec import SunSpecError
from essd.clock import Clock
from essd.domain import DeviceClass
from hil_sim.battery import Alarm, Battery, BatteryParams, BatteryState
from hil_sim.devices.base import build_image
from hil_sim.devices.storage import StorageDevice
from hil_sim.sunspec_image import SunSpecImage

log = logging.getLogger(__name__)


class SunSpecStorageDevice(StorageDevice):
    """SunSpec PCS + BMS: 704 reversion to WSetRvrt, 802 state, events and heartbeat, 713."""

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
            img.set_point("802.State", "FAULT" if tripped else "CONNECTED")
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
        profile, capacity_wh=capacity_wh, max_charge_w=max_charge_w, max_discharge_w=max_discharge_w
    )
    soc = profile.simulation.initial_soc if initial_soc is None else initial_soc
    battery = Battery(params, clock, initial_soc=soc)
    image = build_image(profile, unit=unit)
    cls = _MODELS[profile.simulation.behaviour.model]
    return cls(device_id=device_id, profile=profile, image=image, clock=clock, battery=battery)


_MODELS: dict[str, type[StorageDevice]] = {
    "storage": StorageDevice,
    "sunspec": SunSpecStorageDevice,
    "portable": PortableDevice,
}
