"""What every profile-driven driver shares: identity, capability composition, control methods.

Constructing a concrete driver (``GenericDriver(...)``, ``SunSpecDriver(...)``) returns an
instance of a subclass with one mixin per capability the profile declares, so
``isinstance(driver, ActivePowerControl)`` is true exactly when the device can do it. Each
capability method derives its action's parameters (in essd base units) and hands them to the
driver's :meth:`ProfileDriver._run_action`; how an action becomes register writes is the
concrete driver's business.

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self, cast

from drivers.api import CommunicationError, ValueRefused, WriteResult
from drivers.derive import add_derived
from drivers.profile import ActionName, Capability, Profile
from drivers.states import DeviceStates
from essd.clock import Clock
from essd.domain import (
    BatteryReading,
    DeviceClass,
    LiveLimits,
    MeterReading,
    Quality,
    Reading,
)

__all__ = ["TIME_PARAMS", "ProfileDriver", "Sense", "live_limit_w"]

# Parameters in seconds: rounded up when converted to a register (a 30.2 s TTL never becomes
# 30 s, nor 0, which many devices read as "no limit").
TIME_PARAMS = frozenset({"duration_s", "seconds"})

Sense = Literal["always", "charge", "discharge", "idle"]


class ProfileDriver:
    """Base of the profile-driven drivers; subclasses implement :meth:`_run_action`.

    A subclass marks itself ``_compose_root = True`` to have ``__new__`` pick the composed
    subclass matching the profile's capabilities.
    """

    _composed: ClassVar[dict[tuple[type[ProfileDriver], frozenset[Capability]], type[Any]]] = {}
    _capabilities: ClassVar[frozenset[Capability]] = frozenset()
    _compose_root: ClassVar[bool] = False
    # Whether capability methods refuse non-finite or out-of-domain arguments themselves
    # (ValueRefused naming the argument) before any parameter reaches the action.
    _check_arguments: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """Pick the class whose methods match the profile's capabilities."""
        profile = kwargs.get("profile", args[1] if len(args) > 1 else None)
        sub: type[ProfileDriver] = cls
        if cls.__dict__.get("_compose_root", False) and isinstance(profile, Profile):
            sub = cls._composed_class(frozenset(profile.capabilities))
        return cast(Self, object.__new__(sub))

    @classmethod
    def _composed_class(cls, capabilities: frozenset[Capability]) -> type[ProfileDriver]:
        """The subclass of ``cls`` with one mixin per capability (cached)."""
        key = (cls, capabilities)
        sub = ProfileDriver._composed.get(key)
        if sub is None:
            mixins = tuple(m for cap, m in _MIXINS.items() if cap in capabilities)
            name = f"{cls.__name__}[" + ",".join(sorted(c.value for c in capabilities)) + "]"
            namespace = {"_capabilities": capabilities, "__module__": cls.__module__}
            sub = type(name, (*mixins, cls), namespace)
            ProfileDriver._composed[key] = sub
        return cast(type[ProfileDriver], sub)

    def _init_identity(
        self,
        *,
        device_id: str,
        profile: Profile,
        unit: int | None,
        clock: Clock,
        limits_override: LiveLimits | None,
        capacity_wh: float | None,
        owns_endpoint: bool,
    ) -> None:
        """Store what every driver keeps (the subclass keeps its own transport)."""
        self._device_id = device_id
        self._profile = profile
        self._unit = profile.transport.unit if unit is None else unit
        self._clock = clock
        self._limits_override = limits_override
        self._capacity_wh = capacity_wh if capacity_wh is not None else profile.ratings.capacity_wh
        self._owns_endpoint = owns_endpoint
        self._heartbeat_counter = 0

    # -- identity ------------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        """The device id from the site config."""
        return self._device_id

    @property
    def profile(self) -> Profile:
        """The profile the driver was built from."""
        return self._profile

    @property
    def unit(self) -> int:
        """The Modbus unit id."""
        return self._unit

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._device_id} {self._profile.name} unit {self._unit}>"

    # -- what the concrete driver supplies -----------------------------------------------------

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], DeviceStates]:
        """Read the device once: (time, fields, extra readings, faults and warnings).

        Raises CommunicationError when the device does not answer.
        """
        raise NotImplementedError

    async def _run_action(
        self, action: ActionName, params: Mapping[str, float] | None, when: Sense
    ) -> WriteResult:
        """Run a profile action with ``params`` (base units); ``when`` is the power sense."""
        raise NotImplementedError

    def _heartbeat_after(self, previous: int) -> int:
        """The heartbeat value that follows ``previous`` (the driver's wrap rule)."""
        raise NotImplementedError

    # -- readings shared by every driver -------------------------------------------------------

    async def read(self) -> BatteryReading | MeterReading:
        """Read the device's state: a MeterReading for a meter, else a BatteryReading.

        Invalid values come back as invalid readings with a reason, never numbers. Raises
        CommunicationError when the device does not answer, except for a device with the
        ``availability`` capability (a portable unit that may be unplugged): then the reading
        says ``available=False``.
        """
        try:
            at, fields, extras, states = await self._read_state()
        except CommunicationError as exc:
            if self._profile.has(Capability.AVAILABILITY):
                return self._unavailable(str(exc))
            raise

        def field(name: str, unit: str) -> Reading:
            return fields.get(name) or Reading.bad(
                unit, at, Quality.MISSING, f"profile maps no {name} field"
            )

        if self._profile.device_class is DeviceClass.METER:
            return MeterReading(self._device_id, at, field("grid_power_w", "W"))
        return BatteryReading(
            device_id=self._device_id,
            device_class=self._profile.device_class,
            read_at_mono=at,
            available=True,
            soc=field("soc", "ratio"),
            power_w=field("power_w", "W"),
            limits=self._limits(fields),
            capacity_wh=self._capacity_wh,
            alarms=states.alarms,
            warnings=states.warnings,
            extras={k: v for k, v in extras.items() if k not in ("soc", "power_w")},
        )

    def _add_derived(
        self,
        out: dict[str, Reading],
        at: float,
        raws: Mapping[str, int | float | str] | None = None,
    ) -> None:
        """Add the profile's derived fields and battery-stack aggregates to ``out``."""
        add_derived(self._profile, out, at, raws)

    def _unavailable(self, reason: str) -> BatteryReading:
        """The reading of an unplugged unit: no SoC, no power, held at 0 W both ways."""
        at = self._clock.monotonic()
        return BatteryReading(
            device_id=self._device_id,
            device_class=self._profile.device_class,
            read_at_mono=at,
            available=False,
            soc=Reading.bad("ratio", at, Quality.MISSING, reason),
            power_w=Reading.bad("W", at, Quality.MISSING, reason),
            limits=LiveLimits(0.0, 0.0),
            capacity_wh=self._capacity_wh,
        )

    def _limits(self, fields: Mapping[str, Reading]) -> LiveLimits | None:
        """The ratings, tightened by the BMS's live limits, then by the site's override."""
        ratings = self._profile.ratings
        limits: LiveLimits | None = None
        if ratings.max_charge_w > 0 or ratings.max_discharge_w > 0:
            limits = LiveLimits(ratings.max_charge_w, ratings.max_discharge_w)
        if self._profile.has(Capability.LIVE_LIMITS):
            bms = self._bms_limits(fields)
            limits = bms if limits is None else limits.tighten(bms)
        if self._limits_override is not None:
            o = self._limits_override
            limits = o if limits is None else limits.tighten(o)
        return limits

    def _bms_limits(self, fields: Mapping[str, Reading]) -> LiveLimits:
        """The ``max_charge_w`` / ``max_discharge_w`` fields as limits.

        A declared live limit that cannot be read counts as 0 W: the device is held at idle in
        that direction until its BMS reports again (DESIGN: invalid -> safe).
        """
        return LiveLimits(
            live_limit_w(fields, "max_charge_w") or 0.0,
            live_limit_w(fields, "max_discharge_w") or 0.0,
        )


def live_limit_w(fields: Mapping[str, Reading], name: str) -> float | None:
    """A live-limit field as a magnitude: None when not mapped, 0 when it reads invalid."""
    r = fields.get(name)
    if r is None:
        return None  # not mapped: no opinion
    return max(0.0, r.value) if r.valid and r.value is not None else 0.0


class _ActivePower(ProfileDriver):
    async def set_active_power(self, power_w: float, *, duration_s: float) -> WriteResult:
        """Command ``power_w`` (> 0 discharges, < 0 charges) for at most ``duration_s``."""
        if self._check_arguments and (
            not math.isfinite(power_w) or not math.isfinite(duration_s) or duration_s <= 0
        ):
            raise ValueRefused(
                f"set_active_power: power_w={power_w!r} duration_s={duration_s!r} not usable"
            )
        when: Sense = "charge" if power_w < 0 else "discharge" if power_w > 0 else "idle"
        params = {
            "power_w": power_w,
            "charge_w": max(0.0, -power_w),
            "discharge_w": max(0.0, power_w),
            "abs_w": abs(power_w),
            "duration_s": duration_s,
        }
        return await self._run_action(ActionName.SET_ACTIVE_POWER, params, when)


class _ChargeLimit(ProfileDriver):
    async def set_charge_limit(self, charge_w: float) -> WriteResult:
        """Limit charging to ``charge_w`` W (>= 0)."""
        if self._check_arguments and (not math.isfinite(charge_w) or charge_w < 0):
            raise ValueRefused(f"set_charge_limit: charge_w must be >= 0, got {charge_w!r}")
        return await self._run_action(ActionName.SET_CHARGE_LIMIT, {"charge_w": charge_w}, "always")


class _DischargeLimit(ProfileDriver):
    async def set_discharge_limit(self, discharge_w: float) -> WriteResult:
        """Limit discharging to ``discharge_w`` W (>= 0)."""
        if self._check_arguments and (not math.isfinite(discharge_w) or discharge_w < 0):
            raise ValueRefused(
                f"set_discharge_limit: discharge_w must be >= 0, got {discharge_w!r}"
            )
        return await self._run_action(
            ActionName.SET_DISCHARGE_LIMIT, {"discharge_w": discharge_w}, "always"
        )


class _Outputs(ProfileDriver):
    async def set_output(self, enabled: bool) -> WriteResult:
        """Enable or disable the outputs."""
        action = ActionName.ENABLE_OUTPUT if enabled else ActionName.DISABLE_OUTPUT
        return await self._run_action(action, None, "always")


class _Heartbeat(ProfileDriver):
    async def heartbeat(self) -> WriteResult:
        """Write the next heartbeat value (the driver keeps the counter and wraps it)."""
        nxt = self._heartbeat_after(self._heartbeat_counter)
        # Advance even if the write fails: the next value then differs from whatever the
        # device holds, which is all a heartbeat watchdog looks at.
        self._heartbeat_counter = nxt
        return await self._run_action(ActionName.HEARTBEAT, {"counter": float(nxt)}, "always")


class _RevertTimer(ProfileDriver):
    async def configure_revert_timer(self, seconds: float) -> WriteResult:
        """Make the device drop a setpoint not refreshed within ``seconds`` (rounded up)."""
        if self._check_arguments and (not math.isfinite(seconds) or seconds <= 0):
            raise ValueRefused(f"configure_revert_timer: seconds must be > 0, got {seconds!r}")
        return await self._run_action(
            ActionName.CONFIGURE_REVERT_TIMER, {"seconds": seconds}, "always"
        )


class _SafeMode(ProfileDriver):
    async def safe_mode(self) -> WriteResult:
        """Put the device into its safe state (the profile's safe_mode writes)."""
        return await self._run_action(ActionName.SAFE_MODE, None, "always")


class _SocLimits(ProfileDriver):
    async def set_soc_limits(self, min_soc: float, max_soc: float) -> WriteResult:
        """Set the device's own SoC window (ratios 0..1)."""
        if self._check_arguments and not (0.0 <= min_soc <= max_soc <= 1.0):
            raise ValueRefused(
                f"set_soc_limits: need 0 <= min_soc <= max_soc <= 1, got {min_soc}, {max_soc}"
            )
        return await self._run_action(
            ActionName.SET_SOC_LIMITS, {"min_soc": min_soc, "max_soc": max_soc}, "always"
        )


_MIXINS: dict[Capability, type[ProfileDriver]] = {
    Capability.ACTIVE_POWER: _ActivePower,
    Capability.CHARGE_LIMIT: _ChargeLimit,
    Capability.DISCHARGE_LIMIT: _DischargeLimit,
    Capability.OUTPUT_SWITCH: _Outputs,
    Capability.HEARTBEAT: _Heartbeat,
    Capability.REVERT_TIMER: _RevertTimer,
    Capability.SAFE_MODE: _SafeMode,
    Capability.SOC_LIMITS: _SocLimits,
}
