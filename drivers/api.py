"""Capability protocols of a device driver, and the errors drivers raise.

Small one-purpose protocols, each with its unit: the daemon asks a driver for the ones its
profile declares (``driver.capability(ActivePowerControl)``, the driver or None, as evcc's
``capability(T)``) and never asks for a vendor.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid power > 0 imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from drivers.profile import Capability, Profile
from essd.counters import DeviceCounters
from essd.domain import BatteryReading, MeterReading

C = TypeVar("C")


class DeviceError(Exception):
    """Base of every error a driver raises; library exceptions never leave a driver."""


class CommunicationError(DeviceError):
    """No usable answer: timeout, connection refused or dropped, garbled frame."""


class DeviceExceptionResponse(DeviceError):
    """The device answered with a Modbus exception (``code``: 1 function, 2 address, 3 value...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ValueRefused(DeviceError, ValueError):
    """A command value does not fit a register (range or type); nothing was written."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one control action did: registers written, and any read-back mismatch."""

    action: str
    registers_written: int
    mismatches: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every written register read back as written."""
        return not self.mismatches


@runtime_checkable
class DeviceDriver(Protocol):
    """Every driver: connection lifetime and reading state."""

    @property
    def device_id(self) -> str:
        """The device id from the site config."""
        ...

    @property
    def profile(self) -> Profile:
        """The profile the driver was built from."""
        ...

    async def connect(self) -> None:
        """Open the transport (idempotent; reconnects with back-off are the driver's job)."""
        ...

    async def close(self) -> None:
        """Close the transport."""
        ...

    async def read(self) -> BatteryReading | MeterReading:
        """Read the device's state; invalid values come back as invalid readings, not numbers.

        Raises CommunicationError when the device does not answer at all.
        """
        ...

    def capability(self, kind: type[C]) -> C | None:
        """The driver as ``kind`` (one of the protocols below) when it can do that, else None."""
        ...

    def counters(self) -> DeviceCounters:
        """Cumulative communication counters of this device since start (requests, errors by
        kind, writes, read-back mismatches, latency)."""
        ...


@runtime_checkable
class ActivePowerControl(Protocol):
    """Active power setpoint in W: > 0 discharges into the site, < 0 charges."""

    async def set_active_power(self, power_w: float, *, duration_s: float) -> WriteResult:
        """Command ``power_w`` for at most ``duration_s`` seconds (the setpoint TTL)."""
        ...


@runtime_checkable
class ChargeLimitControl(Protocol):
    """Charge-rate limit in W (magnitude >= 0), e.g. a portable unit's AC charge rate."""

    async def set_charge_limit(self, charge_w: float) -> WriteResult:
        """Limit charging to ``charge_w`` W."""
        ...


@runtime_checkable
class DischargeLimitControl(Protocol):
    """Discharge-rate limit in W (magnitude >= 0)."""

    async def set_discharge_limit(self, discharge_w: float) -> WriteResult:
        """Limit discharging to ``discharge_w`` W."""
        ...


@runtime_checkable
class OutputControl(Protocol):
    """Output switches (AC/DC outlets of a portable unit)."""

    async def set_output(self, enabled: bool) -> WriteResult:
        """Enable or disable the outputs."""
        ...


@runtime_checkable
class HeartbeatControl(Protocol):
    """A heartbeat register: the device reverts to safe when it stops changing."""

    async def heartbeat(self) -> WriteResult:
        """Write the next heartbeat value."""
        ...


@runtime_checkable
class RevertTimerControl(Protocol):
    """A setpoint revert timer in seconds."""

    async def configure_revert_timer(self, seconds: float) -> WriteResult:
        """Make the device drop a setpoint not refreshed within ``seconds``."""
        ...


@runtime_checkable
class SafeModeControl(Protocol):
    """The device's own safe state (0 W, standby)."""

    async def safe_mode(self) -> WriteResult:
        """Put the device into its safe state."""
        ...


@runtime_checkable
class SocLimitControl(Protocol):
    """SoC window the device enforces itself, ratios 0..1."""

    async def set_soc_limits(self, min_soc: float, max_soc: float) -> WriteResult:
        """Set the device's own SoC window."""
        ...


# The profile capability each control protocol stands for.
CAPABILITY_OF: dict[type, Capability] = {
    ActivePowerControl: Capability.ACTIVE_POWER,
    ChargeLimitControl: Capability.CHARGE_LIMIT,
    DischargeLimitControl: Capability.DISCHARGE_LIMIT,
    OutputControl: Capability.OUTPUT_SWITCH,
    HeartbeatControl: Capability.HEARTBEAT,
    RevertTimerControl: Capability.REVERT_TIMER,
    SafeModeControl: Capability.SAFE_MODE,
    SocLimitControl: Capability.SOC_LIMITS,
}
