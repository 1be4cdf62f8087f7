"""Serve a site's devices as static register images from their shipped profiles.

For daemon lifecycle tests (readiness, watchdog, safe stop) that need real devices on real
Modbus sockets but no physics: each device's registers hold plausible fixed values and record
what essd writes. Physics, revert timers and faults are hil_sim's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from drivers.layout import ProfileImage
from drivers.modbus import Framing, ModbusServer
from drivers.profile import Profile, resolve_profile
from drivers.sunspec import SunSpecImage, build_sunspec_image
from essd.config import Settings

EXAMPLE = Path(__file__).parents[2] / "profiles" / "sites" / "example.toml"

Image = ProfileImage | SunSpecImage


def _initial_values(profile: Profile) -> dict[str, float]:
    r = profile.ratings
    volts = 800.0
    return {
        "soc": profile.simulation.initial_soc,
        "power_w": 0.0,
        "grid_power_w": 2000.0,
        "max_charge_w": r.max_charge_w,
        "max_discharge_w": r.max_discharge_w,
        "max_charge_a": r.max_charge_w / volts,
        "max_discharge_a": r.max_discharge_w / volts,
        "dc_voltage_v": volts,
        "capacity_wh": r.capacity_wh,
        "rated_capacity_wh": r.capacity_wh,
        "max_charge_setting_w": r.max_charge_w,
        "max_discharge_setting_w": r.max_discharge_w,
        "max_soc": 1.0,
        "min_soc": 0.0,
        "ac_charge_limit_w": r.max_charge_w,
    }


def image_for(profile: Profile) -> Image:
    """A register image of ``profile`` holding plausible values for every mapped field."""
    image: Image = (
        build_sunspec_image(profile) if profile.driver == "sunspec" else ProfileImage(profile)
    )
    for field, value in _initial_values(profile).items():
        if field in profile.fields:
            with contextlib.suppress(Exception):  # a read-only or derived field: leave it
                image.set_field(field, value)
    return image


@dataclass
class StaticSite:
    """The served devices: ``settings`` points at them; ``images`` hold their registers."""

    settings: Settings
    images: dict[str, Image]
    servers: dict[str, ModbusServer]

    def unplug(self, device_id: str) -> None:
        """The device stops answering (its unit falls silent), as an unplugged unit does."""
        unit = self._unit(device_id)
        self.servers[device_id].remove_store(unit)

    def replug(self, device_id: str) -> None:
        """The device answers again."""
        self.servers[device_id].set_store(self._unit(device_id), self.images[device_id])

    def _unit(self, device_id: str) -> int:
        for dev in self.settings.devices:
            if dev.id == device_id:
                return dev.transport.unit
        raise KeyError(device_id)

    def write_config(self, path: Path, **overrides: Any) -> Path:
        """Write the site's settings as a TOML file (with section overrides merged in)."""
        return write_config(self.settings, path, **overrides)


def write_config(settings: Settings, path: Path, **overrides: Any) -> Path:
    """Write ``settings`` as a TOML file, with section overrides merged in."""
    data = settings.model_dump(mode="json", exclude_none=True)
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(tomli_w.dumps(data))
    return path


@contextlib.asynccontextmanager
async def serve_static_site(settings: Settings) -> AsyncIterator[StaticSite]:
    """Serve every TCP / RTU-over-TCP device of ``settings`` on a free loopback port."""
    images: dict[str, Image] = {}
    servers: dict[str, ModbusServer] = {}
    devices = []
    async with contextlib.AsyncExitStack() as stack:
        for dev in settings.devices:
            profile = resolve_profile(dev.profile)
            image = image_for(profile)
            framing = Framing.RTU if dev.transport.kind == "rtu-over-tcp" else Framing.SOCKET
            server = ModbusServer.tcp({dev.transport.unit: image}, framing=framing)
            await stack.enter_async_context(server)
            images[dev.id] = image
            servers[dev.id] = server
            transport = dev.transport.model_copy(update={"host": "127.0.0.1", "port": server.port})
            devices.append(dev.model_copy(update={"transport": transport}))
        yield StaticSite(settings.model_copy(update={"devices": tuple(devices)}), images, servers)
