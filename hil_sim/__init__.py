"""hil_sim: simulated devices and sites served over real Modbus, for hardware-in-the-loop tests.

The register map of every simulated device is laid out from the very profile its driver reads
(:mod:`drivers.layout`, :mod:`drivers.sunspec`), and served by :class:`drivers.modbus.ModbusServer`.
Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.

- :class:`SimulatedSite` (:mod:`hil_sim.runner`): every device of an essd site config, on its
  configured (or free) loopback ports, on an injected clock, with a fault timeline; ``truth()``
  gives SoC, power per device, grid power and limit violations.
- :mod:`hil_sim.battery`: energy, efficiencies, self-discharge, taper, thermal derating and trip.
- :mod:`hil_sim.devices`: storage units and meters as register stores (commands, revert timers,
  heartbeats and write validation read from the profile's actions).
- :mod:`hil_sim.site`: load/PV/price/carbon series and the grid balance.
- :mod:`hil_sim.faults`, :mod:`hil_sim.proxy`: the fault timeline and the delaying TCP proxy.
- ``python -m hil_sim --site FILE`` / ``essd sim --site FILE``: :mod:`hil_sim.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hil_sim.battery import Alarm, Battery, BatteryParams, BatteryState
    from hil_sim.faults import FaultError, FaultSpec, FaultTimeline, load_faults
    from hil_sim.runner import Endpoint, SimulatedSite
    from hil_sim.site import BatteryTruth, SeriesError, SiteSeries, SiteTruth, Violation

__all__ = [
    "Alarm",
    "Battery",
    "BatteryParams",
    "BatteryState",
    "BatteryTruth",
    "Endpoint",
    "FaultError",
    "FaultSpec",
    "FaultTimeline",
    "SeriesError",
    "SimulatedSite",
    "SiteSeries",
    "SiteTruth",
    "Violation",
    "load_faults",
]

_HOME = {
    "Alarm": "battery",
    "Battery": "battery",
    "BatteryParams": "battery",
    "BatteryState": "battery",
    "FaultError": "faults",
    "FaultSpec": "faults",
    "FaultTimeline": "faults",
    "load_faults": "faults",
    "Endpoint": "runner",
    "SimulatedSite": "runner",
    "BatteryTruth": "site",
    "SeriesError": "site",
    "SiteSeries": "site",
    "SiteTruth": "site",
    "Violation": "site",
}


def __getattr__(name: str) -> Any:
    # Lazy: `essd` imports hil_sim.cli for its `sim` subcommand, and must not pay for pymodbus
    # and the SunSpec models on every start.
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'hil_sim' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hil_sim.{home}"), name)
