"""essd: energy storage control and dispatch daemon.

Sign conventions, everywhere in essd:
- battery/PCS active power in W: > 0 discharges into the site, < 0 charges;
- grid power at the point of connection in W: > 0 imports, < 0 exports.
"""

__version__ = "0.1.0"
