"""Build drivers from the site configuration, sharing one Modbus endpoint per transport.

Units behind the same gateway (same host:port and framing, or the same serial path) share one
:class:`~drivers.modbus.ModbusEndpoint`, so their requests queue on one connection instead of
competing for it, as a real RS-485 bus requires.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from drivers.api import DeviceDriver
from drivers.generic import GenericDriver
from drivers.modbus import (
    DEFAULT_TIMEOUT_S,
    Backoff,
    EndpointTarget,
    Framing,
    ModbusEndpoint,
    SerialTarget,
    TcpTarget,
)
from drivers.profile import Profile
from essd.clock import Clock
from essd.config import DeviceConfig, RtuOverTcpTransport, SerialTransport, TcpTransport
from essd.domain import LiveLimits

__all__ = ["EndpointPool", "build_driver", "config_limits", "target_of"]


def target_of(transport: TcpTransport | RtuOverTcpTransport | SerialTransport) -> EndpointTarget:
    """Where a configured transport connects (the endpoint's identity)."""
    if isinstance(transport, TcpTransport):
        return TcpTarget(transport.host, transport.port, Framing.SOCKET)
    if isinstance(transport, RtuOverTcpTransport):
        return TcpTarget(transport.host, transport.port, Framing.RTU)
    return SerialTarget(
        transport.port,
        baudrate=transport.baudrate,
        parity=transport.parity,
        stopbits=transport.stopbits,
        bytesize=transport.bytesize,
    )


class EndpointPool:
    """One endpoint per transport target; closes them all at the end."""

    def __init__(
        self,
        *,
        clock: Clock,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backoff: Backoff | None = None,
    ) -> None:
        self._clock = clock
        self._timeout_s = timeout_s
        self._backoff = backoff
        self._endpoints: dict[EndpointTarget, ModbusEndpoint] = {}

    def endpoint(self, target: EndpointTarget, *, timeout_s: float | None = None) -> ModbusEndpoint:
        """The endpoint for ``target``, created on first use.

        The first caller's timeout applies: units sharing a line share its timing.
        """
        # One process opens a serial device once, whatever line settings a later unit names.
        key = SerialTarget(target.path) if isinstance(target, SerialTarget) else target
        ep = self._endpoints.get(key)
        if ep is None:
            ep = ModbusEndpoint(
                target,
                clock=self._clock,
                timeout_s=timeout_s or self._timeout_s,
                backoff=self._backoff,
            )
            self._endpoints[key] = ep
        return ep

    def endpoint_for(self, device: DeviceConfig) -> ModbusEndpoint:
        """The endpoint of a configured device."""
        return self.endpoint(target_of(device.transport), timeout_s=device.poll_timeout_s)

    @property
    def endpoints(self) -> tuple[ModbusEndpoint, ...]:
        """Every endpoint created so far."""
        return tuple(self._endpoints.values())

    async def close(self) -> None:
        """Close every endpoint."""
        for ep in self._endpoints.values():
            await ep.close()


def config_limits(device: DeviceConfig, profile: Profile) -> LiveLimits | None:
    """The site config's power limits as LiveLimits (None when it sets none).

    A direction the config leaves open takes the profile's rating, so the override only
    tightens.
    """
    if device.max_charge_w is None and device.max_discharge_w is None:
        return None
    r = profile.ratings
    return LiveLimits(
        device.max_charge_w if device.max_charge_w is not None else r.max_charge_w,
        device.max_discharge_w if device.max_discharge_w is not None else r.max_discharge_w,
    )


def build_driver(
    device: DeviceConfig, profile: Profile, *, clock: Clock, pool: EndpointPool
) -> DeviceDriver:
    """The driver for one configured device: generic (profile-driven) or SunSpec."""
    endpoint = pool.endpoint_for(device)
    limits = config_limits(device, profile)
    driver_class: Callable[..., DeviceDriver] = GenericDriver
    if profile.driver == "sunspec":
        # Imported on use: the SunSpec driver pulls in pysunspec2's model definitions.
        driver_class = importlib.import_module("drivers.sunspec").SunSpecDriver
    return driver_class(
        device_id=device.id,
        profile=profile,
        endpoint=endpoint,
        unit=device.transport.unit,
        clock=clock,
        limits_override=limits,
        capacity_wh=device.capacity_wh,
    )
