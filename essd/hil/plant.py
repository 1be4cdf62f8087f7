"""The plant a HIL scenario runs against: the seam between the runner and the simulator.

:class:`Plant` is what the runner needs from a simulated site: the settings pointing at its
loopback devices, the *true* state (not the daemon's belief: the simulator's
:class:`~hil_sim.truth.SiteTruth`) and a switch per fault.
:func:`essd.hil.runner.simulated_site_factory` opens ``hil_sim``'s simulated site, which is
one; a test may pass any other plant to :func:`essd.hil.runner.run_scenario`.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
Grid = load - PV used - sum(battery).
"""

from __future__ import annotations

from typing import Protocol

from essd.config import Settings
from hil_sim.faults import FaultSpec
from hil_sim.truth import SiteTruth


class Plant(Protocol):
    """A simulated site the runner drives (hil_sim's SimulatedSite is one)."""

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
