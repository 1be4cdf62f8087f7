"""essd: energy storage control and dispatch daemon.

Sign conventions, everywhere in essd:
- battery/PCS active power in W: > 0 discharges into the site, < 0 charges;
- grid power at the point of connection in W: > 0 imports, < 0 exports.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Where ``essd run`` and ``essd check-config`` look for the configuration by default.
DEFAULT_CONFIG_PATH = Path("/etc/essd/essd.toml")
