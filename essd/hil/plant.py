"""The plant a HIL scenario runs against: the seam between the runner and the simulator.

:class:`Plant` is what the runner needs from a simulated site: the settings pointing at its
loopback devices, the *true* state (not the daemon's belief) and a switch per fault.
:func:`essd.hil.runner.simulated_site_factory` adapts ``hil_sim``'s simulated site to it; a
test may pass any other plant to :func:`essd.hil.runner.run_scenario`.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
Grid = load - PV used - sum(battery).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from essd.config import Settings
from essd.hil.scenario import FaultSpec

__all__ = ["BatteryTruth", "Plant", "SiteTruth"]


@dataclass(frozen=True, slots=True)
class BatteryTruth:
    """One unit as it really is. ``power_w`` > 0 discharges; limits are magnitudes (W)."""

    device_id: str
    soc: float
    energy_wh: float
    capacity_wh: float
    power_w: float
    commanded_w: float
    max_charge_w: float
    max_discharge_w: float
    available: bool
    alarm: bool


@dataclass(frozen=True, slots=True)
class SiteTruth:
    """The whole site now: the true series values and every unit.

    ``pv_w`` is the PV actually produced (after any export-limiter curtailment),
    ``pv_available_w`` what the panels could have produced. ``grid_w`` > 0 imports.
    """

    time: float
    load_w: float
    pv_w: float
    pv_available_w: float
    grid_w: float
    batteries: Mapping[str, BatteryTruth]


class Plant(Protocol):
    """A simulated site the runner drives (hil_sim's SimulatedSite adapts to this)."""

    @property
    def settings(self) -> Settings:
        """The site settings with every transport pointing at the served devices."""
        ...

    def truth(self) -> SiteTruth:
        """Advance to the clock's now and return the true state."""
        ...

    def set_fault(self, fault: FaultSpec, active: bool) -> None:
        """Start or clear one fault of the timeline."""
        ...
