"""What every profile-driven driver shares: identity, readings, and the control methods.

Every control method derives its action's parameters (in essd base units) and hands them to the
one action engine (:func:`drivers.engine.run_action`) with the concrete driver as its point
codec. A driver has every control method; :meth:`ProfileDriver.capability` says which ones the
profile declares (``driver.capability(ActivePowerControl)`` is the driver, or None).

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar, cast

from drivers.api import CAPABILITY_OF, CommunicationError, ValueRefused, WriteResult
from drivers.engine import Point, Sense, run_action
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Capability, Profile, RegisterSpec
from drivers.states import DeviceStates
from drivers.write_policy import WriteMemory
from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.domain import BatteryReading, DeviceClass, LiveLimits, MeterReading, Quality, Reading

C = TypeVar("C")


class ProfileDriver:
    """Base of the profile-driven drivers; a subclass is the point codec of its registers
    (:class:`drivers.engine.PointCodec`) and reads the device (:meth:`_read_state`).

    ``limits_override`` (from the site config) can only tighten the profile's ratings and the
    device's live limits; ``capacity_wh`` overrides the rated capacity.
    """

    merge_writes = False  # see drivers.engine.PointCodec

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        endpoint: ModbusEndpoint,
        unit: int | None = None,
        clock: Clock,
        limits_override: LiveLimits | None = None,
        capacity_wh: float | None = None,
        owns_endpoint: bool = False,
    ) -> None:
        self._device_id = device_id
        self._profile = profile
        self._endpoint = endpoint
        self._unit = profile.transport.unit if unit is None else unit
        self._clock = clock
        self._limits_override = limits_override
        self._capacity_wh = capacity_wh if capacity_wh is not None else profile.ratings.capacity_wh
        self._owns_endpoint = owns_endpoint
        self._heartbeat_counter = 0
        self._written = WriteMemory()  # on-change actions skip what the device already holds
        self._bind()

    def capability(self, kind: type[C]) -> C | None:
        """This driver as ``kind`` (a protocol of :mod:`drivers.api`) when the profile
        declares that capability, else None."""
        needed = CAPABILITY_OF.get(kind)
        if needed is not None and not self._profile.has(needed):
            return None
        return cast(C, self) if isinstance(self, kind) else None

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

    @property
    def endpoint(self) -> ModbusEndpoint:
        """The (possibly shared) transport."""
        return self._endpoint

    def counters(self) -> DeviceCounters:
        """Cumulative communication counters of this device (from its Modbus endpoint)."""
        return self._endpoint.stats(self._unit)

    async def connect(self) -> None:
        """Open the transport (CommunicationError if it cannot; reconnects back off)."""
        await self._endpoint.connect()

    async def close(self) -> None:
        """Close the transport when this driver owns it (a shared one is the pool's)."""
        if self._owns_endpoint:
            await self._endpoint.close()

    # -- what the concrete driver supplies -----------------------------------------------------

    def _bind(self) -> None:
        """Check the profile is one this driver runs and prepare its register map."""
        raise NotImplementedError

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], DeviceStates]:
        """Read the device once: (time, fields, extra readings, faults and warnings).

        Raises CommunicationError when the device does not answer.
        """
        raise NotImplementedError

    def _heartbeat_after(self, previous: int) -> int:
        """The heartbeat value that follows ``previous`` (the driver's wrap rule)."""
        raise NotImplementedError

    async def locate(self, specs: Sequence[RegisterSpec]) -> list[Point]:
        """Point codec: each register's address and current scale factor."""
        raise NotImplementedError

    def encode(
        self, action: ActionName, point: Point, param: str | None, value: float | str
    ) -> list[int]:
        """Point codec: the words of one step's value (register units)."""
        raise NotImplementedError

    async def read_back(self, points: Sequence[Point]) -> dict[str, list[int] | str]:
        """Point codec: the words each register holds now, or why it could not be read."""
        raise NotImplementedError

    def mismatch(self, point: Point, wrote: list[int], back: list[int] | str) -> str:
        """Point codec: how a read-back differs from what was written."""
        raise NotImplementedError

    # -- control: every action through the one engine ----------------------------------------

    async def perform(
        self,
        action: ActionName,
        params: Mapping[str, float] | None = None,
        *,
        when: Sense = "always",
    ) -> WriteResult:
        """Run one of the profile's actions with ``params`` (base units); read every write back.

        Raises ValueRefused (nothing written) when a value does not fit its register, and
        CommunicationError / DeviceExceptionResponse when a write fails.
        """
        return await run_action(
            self,
            self._endpoint,
            unit=self._unit,
            profile=self._profile,
            device_id=self._device_id,
            action=action,
            params=params,
            when=when,
            memory=self._written,
            now=self._clock.monotonic(),
            divisor=self._divisor,
        )

    async def _divisor(self, action: ActionName, field: str) -> float:
        """The live value of ``field`` (base units) a parameter is divided by (``divide_by``);
        ValueRefused (nothing written) when it is not a positive reading."""
        reading = (await self.read_fields()).get(field)
        if reading is None or reading.value is None or reading.value <= 0:
            why = "not read" if reading is None else (reading.reason or "not > 0")
            raise ValueRefused(f"{self._device_id}: {action}: {field} is not usable ({why})")
        return reading.value

    async def set_active_power(self, power_w: float, *, duration_s: float) -> WriteResult:
        """Command ``power_w`` (> 0 discharges, < 0 charges) for at most ``duration_s``."""
        if not math.isfinite(power_w) or not math.isfinite(duration_s) or duration_s <= 0:
            raise ValueRefused(
                f"set_active_power: power_w={power_w!r} duration_s={duration_s!r} not usable"
            )
        params = {
            "power_w": power_w,
            "charge_w": max(0.0, -power_w),
            "discharge_w": max(0.0, power_w),
            "abs_w": abs(power_w),
            "duration_s": duration_s,
        }
        when: Sense = "charge" if power_w < 0 else "discharge" if power_w > 0 else "idle"
        return await self.perform(ActionName.SET_ACTIVE_POWER, params, when=when)

    async def set_charge_limit(self, charge_w: float) -> WriteResult:
        """Limit charging to ``charge_w`` W (>= 0)."""
        if not math.isfinite(charge_w) or charge_w < 0:
            raise ValueRefused(f"set_charge_limit: charge_w must be >= 0, got {charge_w!r}")
        return await self.perform(ActionName.SET_CHARGE_LIMIT, {"charge_w": charge_w})

    async def set_discharge_limit(self, discharge_w: float) -> WriteResult:
        """Limit discharging to ``discharge_w`` W (>= 0)."""
        if not math.isfinite(discharge_w) or discharge_w < 0:
            raise ValueRefused(
                f"set_discharge_limit: discharge_w must be >= 0, got {discharge_w!r}"
            )
        return await self.perform(ActionName.SET_DISCHARGE_LIMIT, {"discharge_w": discharge_w})

    async def set_output(self, enabled: bool) -> WriteResult:
        """Enable or disable the outputs."""
        return await self.perform(
            ActionName.ENABLE_OUTPUT if enabled else ActionName.DISABLE_OUTPUT
        )

    async def heartbeat(self) -> WriteResult:
        """Write the next heartbeat value (the driver keeps the counter and wraps it)."""
        if ActionName.HEARTBEAT not in self._profile.actions:
            raise ValueRefused(f"{self._device_id}: profile {self._profile.name} has no heartbeat")
        nxt = self._heartbeat_after(self._heartbeat_counter)
        # Advance even if the write fails: the next value then differs from whatever the
        # device holds, which is all a heartbeat watchdog looks at.
        self._heartbeat_counter = nxt
        return await self.perform(ActionName.HEARTBEAT, {"counter": float(nxt)})

    async def configure_revert_timer(self, seconds: float) -> WriteResult:
        """Make the device drop a setpoint not refreshed within ``seconds`` (rounded up)."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueRefused(f"configure_revert_timer: seconds must be > 0, got {seconds!r}")
        return await self.perform(ActionName.CONFIGURE_REVERT_TIMER, {"seconds": seconds})

    async def safe_mode(self) -> WriteResult:
        """Put the device into its safe state (the profile's safe_mode writes)."""
        return await self.perform(ActionName.SAFE_MODE)

    async def set_soc_limits(self, min_soc: float, max_soc: float) -> WriteResult:
        """Set the device's own SoC window (ratios 0..1)."""
        if not (0.0 <= min_soc <= max_soc <= 1.0):
            raise ValueRefused(
                f"set_soc_limits: need 0 <= min_soc <= max_soc <= 1, got {min_soc}, {max_soc}"
            )
        return await self.perform(
            ActionName.SET_SOC_LIMITS, {"min_soc": min_soc, "max_soc": max_soc}
        )

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

    async def read_fields(self) -> dict[str, Reading]:
        """Every field of the profile (and derived field) as a reading in base units, invalid
        ones with a reason. Raises CommunicationError when the device does not answer."""
        return (await self._read_state())[1]

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
