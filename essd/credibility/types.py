"""The credibility rules' settings (and their defaults for a configured site), causes and
verdicts (the rules are in :mod:`.unit`, :mod:`.meter` and :mod:`.monitor`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from drivers.profile import Profile
from essd.config import Settings
from essd.domain import BatteryReading
from essd.safety import DeviceEnvelope

# Reading extras that are a counter the unit itself increments (SunSpec 802.Hb).
HEARTBEAT_FIELDS = ("battery_heartbeat",)
# The smallest power mismatch (W) taken as a unit not following its command (meter-grade noise).
MIN_POWER_TOLERANCE_W = 100.0


class UnitCause(StrEnum):
    """Why a storage unit's readings are not believed."""

    FROZEN_SOC = "frozen_soc"  # energy moved beyond the SoC resolution, SoC did not move
    FROZEN_HEARTBEAT = "frozen_heartbeat"  # its own heartbeat counter stopped
    POWER_MISMATCH = "power_mismatch"  # reported power not what it was told, after settling
    SOC_DRIFT = "soc_drift"  # SoC moved differently from the energy it moved


class MeterCause(StrEnum):
    """Why the grid meter's reading is not believed this cycle."""

    NO_READING = "no_reading"  # missing, stale or invalid (the device layer's verdict)
    OUT_OF_RANGE = "out_of_range"  # beyond what the connection can carry
    UNCONFIRMED_JUMP = "unconfirmed_jump"  # a load step beyond max_load_step_w, not yet confirmed
    FROZEN = "frozen"  # the same value although the batteries moved


@dataclass(frozen=True, slots=True)
class CredibilitySettings:
    """Thresholds of the credibility rules (see the module docstring). Powers in W >= 0."""

    connection_max_w: float
    max_load_step_w: float
    limit_margin_w: float = 0.0
    dwell_s: float = 300.0
    max_dwell_s: float = 3600.0
    settle_s: float = 30.0
    power_tolerance_ratio: float = 0.05
    frozen_soc_steps: float = 2.0
    soc_tolerance: float = 0.01
    heartbeat_stall_s: float = 30.0


@dataclass(frozen=True, slots=True)
class CredibilityInput:
    """One cycle's facts for the credibility rules.

    ``commanded_w``: the W command in force on each unit since the last cycle (battery sign;
    for charge-limit units minus the limit), None while it is under no W command (safe mode,
    never written). ``grid_power_w``: the meter, None when the device layer found it invalid.
    ``soc_resolution``: one SoC register step per unit (ratio; default 0.01).
    ``import_limit_w``/``export_limit_w``: the site limits (a repeated meter reading may hide
    no more battery movement than the guard's margin inside the tighter of them).
    """

    now_mono: float
    envelopes: Mapping[str, DeviceEnvelope]
    readings: Mapping[str, BatteryReading]
    commanded_w: Mapping[str, float | None]
    grid_power_w: float | None
    soc_resolution: Mapping[str, float] = field(default_factory=dict)
    import_limit_w: float = math.inf
    export_limit_w: float = math.inf


@dataclass(frozen=True, slots=True)
class UnitVerdict:
    """What the guard may believe about one unit this cycle.

    ``power_band_w``: (lo, hi) of its power now for the site balance (None: its reading is
    exact; (0, 0) for a held unit past settling: it adds nothing). ``soc_band``: (lo, hi)
    ratio for the reserve and max-SoC checks (None: no SoC known).
    """

    credible: bool
    cause: UnitCause | None = None
    detail: str = ""
    held_since_mono: float | None = None
    dwell_s: float = 0.0
    power_band_w: tuple[float, float] | None = None
    soc_band: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class MeterVerdict:
    """Whether the meter's reading is believed; ``grid_power_w`` is None when it is not."""

    plausible: bool
    grid_power_w: float | None
    cause: MeterCause | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CredibilityReport:
    """The cycle's credibility verdicts, for the guard and for the cycle's record."""

    units: Mapping[str, UnitVerdict]
    meter: MeterVerdict
    limit_margin_w: float


# The credibility thresholds of a configured site: defaults derived from its limits and units.


def rating(env: DeviceEnvelope) -> float:
    """The larger of a unit's charge and discharge ratings (W)."""
    return max(env.max_charge_w, env.max_discharge_w)


def default_connection_max_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """Twice the largest of the two limits and the batteries' total rating (W).

    The grid can exceed a limit by what the batteries stop covering; twice the largest of
    these is beyond anything the site can draw or feed and well inside a glitch.
    """
    total = sum(rating(e) for e in envelopes)
    return 2.0 * max(import_limit_w, export_limit_w, total)


def default_max_load_step_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """A quarter of the largest of the two limits and the batteries' total rating (W)."""
    total = sum(rating(e) for e in envelopes)
    return 0.25 * max(import_limit_w, export_limit_w, total)


def default_limit_margin_w(import_limit_w: float, export_limit_w: float) -> float:
    """3 % of the larger limit (W): a class-1 meter's error at the limit plus a small load step
    within one cycle, capped so the window between the limits never closes."""
    margin = 0.03 * max(import_limit_w, export_limit_w)
    return min(margin, (import_limit_w + export_limit_w) / 4.0)


def settings_for_site(
    settings: Settings, envelopes: Iterable[DeviceEnvelope]
) -> CredibilitySettings:
    """The credibility thresholds of a configured site, defaults filled in."""
    envs = list(envelopes)
    site, cred = settings.site, settings.credibility
    imp, exp = site.grid_import_limit_w, site.grid_export_limit_w
    return CredibilitySettings(
        connection_max_w=(
            site.connection_max_w
            if site.connection_max_w is not None
            else default_connection_max_w(imp, exp, envs)
        ),
        max_load_step_w=(
            site.max_load_step_w
            if site.max_load_step_w is not None
            else default_max_load_step_w(imp, exp, envs)
        ),
        limit_margin_w=(
            site.limit_margin_w
            if site.limit_margin_w is not None
            else default_limit_margin_w(imp, exp)
        ),
        dwell_s=cred.dwell_s,
        max_dwell_s=cred.max_dwell_s,
        settle_s=cred.settle_s,
        power_tolerance_ratio=cred.power_tolerance_ratio,
        frozen_soc_steps=cred.frozen_soc_steps,
        soc_tolerance=cred.soc_tolerance,
        heartbeat_stall_s=cred.heartbeat_stall_s,
    )


def soc_resolution(profile: Profile) -> float:
    """One register step of a profile's SoC, as a ratio (0.01 when the profile cannot say:
    a SunSpec scale factor read at run time, or no SoC register)."""
    name = profile.fields.get("soc")
    spec = next((r for r in profile.registers if r.name == name), None)
    if spec is None or spec.point is not None or spec.scale_factor is not None:
        return 0.01
    step = abs(spec.scale) / 100.0 if spec.unit == "%" else abs(spec.scale)
    return step if step > 0 else 0.01
