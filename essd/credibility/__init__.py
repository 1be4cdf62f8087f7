"""Credibility of the readings the safety guard acts on: battery units and the grid meter.

A reading can be valid (in range, fresh, not NaN) and still be wrong: registers frozen behind a
gateway cache, a unit that does not do what it reports, a meter glitch inside its register
range. The guard corrects the site limits in closed loop from these readings, so a wrong value
turns into a wrong setpoint. This module decides, each cycle and before the guard, which
readings can be believed, and hands the guard a screened :class:`GuardInput`.

Rules for each storage unit (all on the injected monotonic clock, no I/O):

- **Frozen, by physics.** SoC readings are quantized (one register step, e.g. 1 % of
  capacity). Energy moved since the SoC last changed is integrated from what the unit was told
  (for charge-rate units, the smaller of that and what it reports), with the charge
  efficiency: only when it
  exceeds ``frozen_soc_steps`` register steps plus ``soc_tolerance`` without the SoC moving is
  the unit frozen. Steady idle or low power never moves that much energy, so it is never
  frozen. A heartbeat counter (``battery_heartbeat``) that was seen counting and then stops for
  ``heartbeat_stall_s`` is frozen too.
- **Power follows the command.** ``settle_s`` after the command last changed, the reported
  power must be within tolerance (``power_tolerance_ratio`` of the rating, at least
  ``MIN_POWER_TOLERANCE_W``) of the command clamped to the live limits. Units that can only be
  told to charge (a charge-rate limit) must merely not charge more than allowed. A power
  register reading exactly the same for ``settle_s`` while the command was away from it is
  stuck, even when the command keeps changing (and so never settles).
- **SoC follows the energy.** When the SoC changes, the change must match the energy moved
  since it last changed, within two register steps, ``soc_tolerance`` and 10 % of the change.
- **Held, not flapping.** A unit failing any rule is not credible: the guard holds it at 0 W
  and it stays held until it has read credibly for ``dwell_s`` (doubling, up to
  ``max_dwell_s``, when it relapses within ``max_dwell_s`` of its release). A unit being put in
  safe mode or told 0 W does not make it credible; only verified readings do.

What the guard is told about a unit's power (the site balance is
``grid_next = meter + sum(true battery power now) - sum(new setpoints)``):

- credible and settled: its reading;
- credible, command changed less than ``settle_s`` ago: the interval between its reading and
  its command (it may lag or lead), used pessimistically per limit;
- not credible, within ``settle_s`` of being held: unknown, anywhere in
  ``[-max_charge, +max_discharge]``. Whether it obeys the new 0 W or keeps going, its change is
  inside that band, so the guard narrows the import headroom by its discharge rating and the
  export headroom by its charge rating, and idles every battery when the band is wider than the
  window between the limits;
- not credible after that: its true power is steady (it has had ``settle_s`` to obey, and a
  unit that ignores commands is as steady as the load), and the meter already carries it, so it
  adds nothing to the prediction; its reading is not used at all.

The SoC given to the guard is an interval: dead-reckoned from the last SoC change with the
pessimistic reading of command and measurement, so a SoC register that stopped moving cannot
lead a unit below its reserve. For a unit that is not credible, its last credible SoC.

Rules for the grid meter (an implausible reading leaves no site headroom: every battery idles
this cycle, with a typed :class:`MeterCause`):

- outside ``+-connection_max_w``;
- a change of the site's net load (meter + credible battery power) by more than
  ``max_load_step_w`` since the last accepted reading is unconfirmed until a second reading
  agrees with it (within half that step): a single glitch idles one cycle, a real step one cycle;
- a frozen meter: the very same value again although the batteries' power changed by more than
  the limit margin; it stays implausible until its value changes.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid W > 0 imports.
"""

from essd.credibility.monitor import CredibilityMonitor, Screened
from essd.credibility.types import (
    CredibilityReport,
    CredibilitySettings,
    MeterCause,
    MeterVerdict,
    UnitCause,
    UnitVerdict,
    default_connection_max_w,
    default_limit_margin_w,
    default_max_load_step_w,
    settings_for_site,
    soc_resolution,
)

__all__ = [
    "CredibilityMonitor",
    "CredibilityReport",
    "CredibilitySettings",
    "MeterCause",
    "MeterVerdict",
    "Screened",
    "UnitCause",
    "UnitVerdict",
    "default_connection_max_w",
    "default_limit_margin_w",
    "default_max_load_step_w",
    "settings_for_site",
    "soc_resolution",
]
