"""From the site configuration to endpoint targets and drivers (the glue the drivers never see).

Battery power limits are W magnitudes; a configured limit only tightens the profile's rating.
"""

from __future__ import annotations

from drivers.base import ProfileDriver
from drivers.factory import EndpointPool, make_driver
from drivers.modbus import EndpointTarget, Framing, ModbusEndpoint, SerialTarget, TcpTarget
from drivers.profile import Profile
from essd.clock import Clock
from essd.config import DeviceConfig, RtuOverTcpTransport, SerialTransport, TcpTransport
from essd.domain import LiveLimits


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


def endpoint_for(pool: EndpointPool, device: DeviceConfig) -> ModbusEndpoint:
    """The pooled endpoint of a configured device."""
    return pool.endpoint(target_of(device.transport), timeout_s=device.poll_timeout_s)


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
) -> ProfileDriver:
    """The driver for one configured device, on its pooled endpoint."""
    return make_driver(
        profile,
        device_id=device.id,
        endpoint=endpoint_for(pool, device),
        unit=device.transport.unit,
        clock=clock,
        limits_override=config_limits(device, profile),
        capacity_wh=device.capacity_wh,
    )
