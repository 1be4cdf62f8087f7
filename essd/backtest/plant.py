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

from typing import TypeVar, cast

from drivers.api import CAPABILITY_OF, WriteResult
from drivers.profile import Profile
from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.domain import BatteryReading, DeviceClass, LiveLimits, MeterReading, Reading

C = TypeVar("C")


class _Replayed:
    """Identity, lifetime and capabilities shared by the replayed devices."""

    def __init__(self, device_id: str, profile: Profile, clock: Clock) -> None:
        self._device_id = device_id
        self._profile = profile
        self._clock = clock
        self._writes = 0
        self._reads = 0

    @property
    def device_id(self) -> str:
        """The device id from the site config."""
        return self._device_id

    @property
    def profile(self) -> Profile:
        """The profile the device was built from."""
        return self._profile

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to close."""

    def capability(self, kind: type[C]) -> C | None:
        """This device as ``kind`` when its profile declares that capability, else None."""
        needed = CAPABILITY_OF.get(kind)
        if needed is not None and not self._profile.has(needed):
            return None
        return cast(C, self) if isinstance(self, kind) else None

    def counters(self) -> DeviceCounters:
        """Reads and writes so far (nothing can fail in memory)."""
        return DeviceCounters(requests_total=self._reads, writes_total=self._writes)

    def _written(self, action: str) -> WriteResult:
        self._writes += 1
        return WriteResult(action, 1)


class ReplayBattery(_Replayed):
    """One storage unit as an energy model; commands are taken as they are written."""

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
        super().__init__(device_id, profile, clock)
        self._capacity_wh = capacity_wh
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

    async def read(self) -> BatteryReading | MeterReading:
        """The unit's state (SoC, last step's power, ratings as limits)."""
        self._reads += 1
        at = self._clock.monotonic()
        extras = {} if self.pv_w is None else {"pv_power_w": Reading.good(self.pv_w, "W", at)}
        return BatteryReading(
            device_id=self._device_id,
            device_class=self._profile.device_class,
            read_at_mono=at,
            available=True,
            soc=Reading.good(self.soc, "ratio", at),
            power_w=Reading.good(self.power_w, "W", at),
            limits=LiveLimits(self.max_charge_w, self.max_discharge_w),
            capacity_wh=self._capacity_wh,
            extras=extras,
        )

    async def set_active_power(self, power_w: float, *, duration_s: float) -> WriteResult:
        """Hold ``power_w`` (> 0 discharges) until the next command."""
        self.commanded_w = float(power_w)
        return self._written("set_active_power")

    async def set_charge_limit(self, charge_w: float) -> WriteResult:
        """Charge at ``charge_w`` (a unit without a power setpoint charges at its limit)."""
        self.commanded_w = -float(charge_w)
        return self._written("set_charge_limit")

    async def safe_mode(self) -> WriteResult:
        """Idle."""
        self.commanded_w = 0.0
        return self._written("safe_mode")

    async def configure_revert_timer(self, seconds: float) -> WriteResult:
        """Accepted; the replay holds every command for its step."""
        return self._written("configure_revert_timer")

    async def heartbeat(self) -> WriteResult:
        """Accepted."""
        return self._written("heartbeat")

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


class ReplayMeter(_Replayed):
    """The grid meter: reports the average grid power of the step that just ended."""

    def __init__(self, device_id: str, profile: Profile, *, clock: Clock) -> None:
        super().__init__(device_id, profile, clock)
        self.grid_w = 0.0

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


def is_meter(profile: Profile) -> bool:
    """True for a meter profile."""
    return profile.device_class is DeviceClass.METER
