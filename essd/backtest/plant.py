"""The replayed site: storage units and a grid meter in memory, behind the real driver API.

The controller drives them through :class:`essd.devices.ManagedDevice` exactly as it drives
Modbus devices; no register is involved. Each battery is a simple energy model from its
profile and site config (capacity, one-way efficiencies, power ratings): a command is held for
the whole step (no revert timer runs out inside a step), clipped to the ratings and to what
the stored energy allows, and stored energy moves by ``dt * (eta_c * charge - discharge /
eta_d)``. The meter reports the grid of the step that just ended, so at every cycle the
controller sees only the past.

Battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from drivers.api import WriteResult
from drivers.base import ProfileDriver, Sense
from drivers.profile import ActionName, Profile
from essd.clock import Clock
from essd.domain import BatteryReading, DeviceClass, LiveLimits, MeterReading, Reading

__all__ = ["ReplayBattery", "ReplayMeter"]


class ReplayBattery(ProfileDriver):
    """One storage unit as an energy model; commands are taken as they are written."""

    _compose_root: ClassVar[bool] = True

    def __init__(
        self,
        device_id: str,
        profile: Profile,
        *,
        clock: Clock,
        capacity_wh: float,
        soc: float,
        max_charge_w: float,
        max_discharge_w: float,
        charge_efficiency: float,
        discharge_efficiency: float,
    ) -> None:
        self._init_identity(
            device_id=device_id,
            profile=profile,
            unit=None,
            clock=clock,
            limits_override=None,
            capacity_wh=capacity_wh,
            owns_endpoint=True,
        )
        self.energy_wh = soc * capacity_wh
        self.commanded_w = 0.0
        self.power_w = 0.0  # what the unit did over the last step
        self.max_charge_w = max_charge_w
        self.max_discharge_w = max_discharge_w
        self.eta_c = charge_efficiency
        self.eta_d = discharge_efficiency
        self.pv_w: float | None = None  # PV this unit measures, reported as pv_power_w

    @property
    def soc(self) -> float:
        """Stored energy as a ratio of capacity."""
        return self.energy_wh / self._capacity_wh

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to close."""

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], tuple[str, ...]]:
        at = self._clock.monotonic()
        fields = {
            "soc": Reading.good(self.soc, "ratio", at),
            "power_w": Reading.good(self.power_w, "W", at),
        }
        extras = {} if self.pv_w is None else {"pv_power_w": Reading.good(self.pv_w, "W", at)}
        return at, fields, extras, ()

    async def read(self) -> BatteryReading | MeterReading:
        """The unit's state (SoC, last step's power, ratings as limits)."""
        at, fields, extras, alarms = await self._read_state()
        return BatteryReading(
            device_id=self._device_id,
            device_class=self._profile.device_class,
            read_at_mono=at,
            available=True,
            soc=fields["soc"],
            power_w=fields["power_w"],
            limits=LiveLimits(self.max_charge_w, self.max_discharge_w),
            capacity_wh=self._capacity_wh,
            alarms=alarms,
            extras=extras,
        )

    async def _run_action(
        self, action: ActionName, params: Mapping[str, float] | None, when: Sense
    ) -> WriteResult:
        p = params or {}
        if action is ActionName.SET_ACTIVE_POWER:
            self.commanded_w = float(p["power_w"])
        elif action is ActionName.SET_CHARGE_LIMIT:
            self.commanded_w = -float(p["charge_w"])
        elif action in (ActionName.SAFE_MODE, ActionName.DISABLE_OUTPUT):
            self.commanded_w = 0.0
        return WriteResult(action.value, 1)

    def _heartbeat_after(self, previous: int) -> int:
        return (previous + 1) % 65_536

    def step(self, dt_s: float) -> float:
        """Run the held command for ``dt_s`` seconds; returns the AC power it achieved (W)."""
        h = dt_s / 3600.0
        p = min(max(self.commanded_w, -self.max_charge_w), self.max_discharge_w)
        if p > 0:
            p = min(p, self.energy_wh * self.eta_d / h)
            self.energy_wh -= h * p / self.eta_d
        elif p < 0:
            p = max(p, -(self._capacity_wh - self.energy_wh) / (self.eta_c * h))
            self.energy_wh -= h * p * self.eta_c
        self.energy_wh = min(max(self.energy_wh, 0.0), self._capacity_wh)
        self.power_w = p
        return p


class ReplayMeter(ProfileDriver):
    """The grid meter: reports the average grid power of the step that just ended."""

    _compose_root: ClassVar[bool] = True

    def __init__(self, device_id: str, profile: Profile, *, clock: Clock) -> None:
        self._init_identity(
            device_id=device_id,
            profile=profile,
            unit=None,
            clock=clock,
            limits_override=None,
            capacity_wh=0.0,
            owns_endpoint=True,
        )
        self.grid_w = 0.0
        self._reads = 0

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to close."""

    async def read(self) -> BatteryReading | MeterReading:
        """The last step's grid power (W, > 0 imports).

        A real meter never reads exactly the same twice; a battery that holds the grid at
        exactly 0 W would otherwise make two readings identical and the meter look frozen
        (essd.devices). The reading carries a dither of +-0.01 W, alternating per read.
        """
        at = self._clock.monotonic()
        self._reads += 1
        dither = 0.01 if self._reads % 2 else -0.01
        return MeterReading(self._device_id, at, Reading.good(self.grid_w + dither, "W", at))

    async def _run_action(
        self, action: ActionName, params: Mapping[str, float] | None, when: Sense
    ) -> WriteResult:
        return WriteResult(action.value, 0)


def is_meter(profile: Profile) -> bool:
    """True for a meter profile."""
    return profile.device_class is DeviceClass.METER
