"""hil_sim: simulated devices and sites served over real Modbus, for hardware-in-the-loop tests.

The register map of every simulated device is laid out from the very profile its driver reads
(:mod:`hil_sim.profile_image` and :mod:`hil_sim.sunspec_image`, through the codecs of
:mod:`drivers.layout` and :mod:`drivers.sunspec`), and served by
:class:`hil_sim.modbus_server.ModbusServer` (:mod:`hil_sim.store`: what a served device is).
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
