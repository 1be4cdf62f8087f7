"""Simulated devices: register stores laid out from the very profiles the drivers read.

Each device is a :class:`hil_sim.store.RegisterStore` that
:class:`hil_sim.modbus_server.ModbusServer` serves. Its register map comes from
:class:`hil_sim.profile_image.ProfileImage` (plain profiles) or
:func:`hil_sim.sunspec_image.build_sunspec_image` (SunSpec profiles), so the driver and the
simulator cannot drift apart. Sign conventions: battery W > 0 discharges into the site, < 0
charges; grid W > 0 imports.

- :mod:`hil_sim.devices.base`: the register map, injectable faults, named access, and the
  site meter;
- :mod:`hil_sim.devices.storage`: storage units driven by their profile's actions;
- :mod:`hil_sim.devices.behaviours`: per-class behaviours and the factory that picks one.
"""

from hil_sim.devices.base import MeterDevice, SimDevice, build_image
from hil_sim.devices.behaviours import PortableDevice, build_storage_device
from hil_sim.devices.storage import StorageDevice

__all__ = [
    "MeterDevice",
    "PortableDevice",
    "SimDevice",
    "StorageDevice",
    "build_image",
    "build_storage_device",
]
