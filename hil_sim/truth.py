"""The true state of a simulated site, and the one violation oracle that judges it.

The simulator's own record (:meth:`hil_sim.site.Site.truth`, each violation counted once when
it starts) and the HIL key figures (:func:`essd.hil.kpi.violations_of`, every sample) ask
:func:`violations_in` the same question with the same tolerances:

- SoC: outside the window by more than ``SOC_TOL`` (0.005) *and moving further out* by more
  than ``POWER_TOL_W`` (a unit that arrives outside, a portable coming home nearly empty, is
  not essd's doing until it pushes it further);
- commanded power: beyond min(true live limit, configured limit) by more than
  ``POWER_TOL_RATIO`` (0.5 %) + ``POWER_TOL_W`` (1 W): register resolution and one sub-step
  of drift;
- site: grid power beyond the import or export limit by more than ``Limits.site_tolerance_w``
  (``SITE_TOL_W``, 1 W, unless a scenario sets its own).

Sign conventions: battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

POWER_TOL_W = 1.0
POWER_TOL_RATIO = 0.005
SOC_TOL = 0.005
SITE_TOL_W = 1.0


@dataclass(frozen=True, slots=True)
class BatteryTruth:
    """One unit as it really is. ``power_w`` > 0 discharges into the site; limits in W >= 0."""

    device_id: str
    soc: float
    energy_wh: float
    capacity_wh: float
    power_w: float
    commanded_w: float
    max_charge_w: float
    max_discharge_w: float
    temperature_c: float
    available: bool
    alarm: bool
    reverts: int


@dataclass(frozen=True, slots=True)
class Violation:
    """A limit the true state broke: ``kind`` at ``time`` on ``device`` ("site" for the grid).

    ``kind``: ``soc_below_reserve`` / ``soc_above_max`` (the configured SoC window),
    ``charge_limit`` / ``discharge_limit`` (a commanded power beyond the limits),
    ``import_limit`` / ``export_limit`` (site grid limits, W).
    """

    time: float
    kind: str
    device: str
    value: float
    limit: float


@dataclass(frozen=True, slots=True)
class SiteTruth:
    """The whole site at ``time``: series values, grid power (> 0 imports), every unit.

    ``pv_w`` is the PV actually produced (after export-limiter curtailment), ``pv_available_w``
    what the panels could produce; ``violations`` the simulator's record so far.
    """

    time: float
    load_w: float
    pv_w: float
    pv_available_w: float
    grid_w: float
    batteries: dict[str, BatteryTruth]
    violations: tuple[Violation, ...] = ()


@dataclass
class Limits:
    """What must hold: per-unit SoC window and configured power limits (W), site limits (W;
    inf = not checked). ``commanded``: the units essd commands a power to (None: all); the
    others (portable units) it steers through a charge limit, so their "commanded" power is
    the campers' use, not essd's."""

    import_w: float = math.inf
    export_w: float = math.inf
    reserve_soc: dict[str, float] = field(default_factory=dict)
    max_soc: dict[str, float] = field(default_factory=dict)
    max_charge_w: dict[str, float] = field(default_factory=dict)
    max_discharge_w: dict[str, float] = field(default_factory=dict)
    commanded: frozenset[str] | None = None
    site_tolerance_w: float = SITE_TOL_W


def violations_in(
    truth: SiteTruth, limits: Limits, *, commands: bool = True, site: bool = True
) -> list[Violation]:
    """The limits ``truth`` breaks now; commanded powers only with ``commands`` (right after
    a cycle wrote them), the grid only with ``site``."""
    out: list[Violation] = []
    t = truth.time
    for dev, b in truth.batteries.items():
        lo, hi = limits.reserve_soc.get(dev, 0.0), limits.max_soc.get(dev, 1.0)
        if b.soc < lo - SOC_TOL and b.power_w > POWER_TOL_W:
            out.append(Violation(t, "soc_below_reserve", dev, b.soc, lo))
        if b.soc > hi + SOC_TOL and b.power_w < -POWER_TOL_W:
            out.append(Violation(t, "soc_above_max", dev, b.soc, hi))
        if not commands or (limits.commanded is not None and dev not in limits.commanded):
            continue
        ch = min(b.max_charge_w, limits.max_charge_w.get(dev, math.inf))
        dis = min(b.max_discharge_w, limits.max_discharge_w.get(dev, math.inf))
        if -b.commanded_w > ch * (1 + POWER_TOL_RATIO) + POWER_TOL_W:
            out.append(Violation(t, "charge_limit", dev, -b.commanded_w, ch))
        if b.commanded_w > dis * (1 + POWER_TOL_RATIO) + POWER_TOL_W:
            out.append(Violation(t, "discharge_limit", dev, b.commanded_w, dis))
    tol = limits.site_tolerance_w
    if site and truth.grid_w > limits.import_w + tol:
        out.append(Violation(t, "import_limit", "site", truth.grid_w, limits.import_w))
    if site and -truth.grid_w > limits.export_w + tol:
        out.append(Violation(t, "export_limit", "site", -truth.grid_w, limits.export_w))
    return out
