"""The OCPP central system (adapter layer): chargers connect to essd over OCPP 1.6J or 2.0.1.

- :mod:`essd.ocpp.server`: :class:`CentralSystem`, the WebSocket server and ChargerPort;
- :mod:`essd.ocpp.v16` / :mod:`essd.ocpp.v201`: one connected charger per protocol version;
- :mod:`essd.ocpp.registry`: what is known per charger (status, meter, transactions);
- :mod:`essd.ocpp.common`: what both versions share: the TxProfile limit in the charger's unit,
  OCPP error replies for every bad frame.

Units: power W (> 0 the charger draws from the site), energy Wh, current A per phase.
"""

from essd.ocpp.registry import RateUnit
from essd.ocpp.server import CentralSystem

__all__ = ["CentralSystem", "RateUnit"]
