"""Build drivers for endpoint targets, sharing one Modbus endpoint per transport.

Units behind the same gateway (same host:port and framing, or the same serial path) share one
:class:`~drivers.modbus.ModbusEndpoint`, so their requests queue on one connection instead of
competing for it, as a real RS-485 bus requires. Drivers know endpoint targets, never the site
configuration: :mod:`essd.endpoints` maps a configured device to its target and driver.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from drivers.base import ProfileDriver
from drivers.generic import GenericDriver
from drivers.modbus import DEFAULT_TIMEOUT_S, EndpointTarget, ModbusEndpoint, SerialTarget
from drivers.profile import Profile
from essd.clock import Backoff, Clock
from essd.domain import LiveLimits


class EndpointPool:
    """One endpoint per transport target; closes them all at the end."""

    def __init__(
        self, *, clock: Clock, timeout_s: float = DEFAULT_TIMEOUT_S, backoff: Backoff | None = None
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

    @property
    def endpoints(self) -> tuple[ModbusEndpoint, ...]:
        """Every endpoint created so far."""
        return tuple(self._endpoints.values())

    async def close(self) -> None:
        """Close every endpoint."""
        for ep in self._endpoints.values():
            await ep.close()


def make_driver(
    profile: Profile,
    *,
    device_id: str,
    endpoint: ModbusEndpoint,
    unit: int,
    clock: Clock,
    limits_override: LiveLimits | None = None,
    capacity_wh: float | None = None,
) -> ProfileDriver:
    """The driver for one unit at ``endpoint``: generic (profile-driven) or SunSpec.

    ``limits_override`` tightens the profile's power ratings (W magnitudes); ``capacity_wh``
    is the usable energy when the profile does not give it.
    """
    driver_class: Callable[..., ProfileDriver] = GenericDriver
    if profile.driver == "sunspec":
        # Imported on use: the SunSpec driver pulls in pysunspec2's model definitions.
        driver_class = importlib.import_module("drivers.sunspec").SunSpecDriver
    return driver_class(
        device_id=device_id,
        profile=profile,
        endpoint=endpoint,
        unit=unit,
        clock=clock,
        limits_override=limits_override,
        capacity_wh=capacity_wh,
    )
