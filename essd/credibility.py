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

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from drivers.profile import Profile
from essd.config import Settings
from essd.domain import BatteryReading, Quality, Reading
from essd.safety import DeviceEnvelope, GuardInput, side_margin

__all__ = [
    "HEARTBEAT_FIELDS",
    "MIN_POWER_TOLERANCE_W",
    "CredibilityInput",
    "CredibilityMonitor",
    "CredibilityReport",
    "CredibilitySettings",
    "CredibilityState",
    "MeterCause",
    "MeterVerdict",
    "Screened",
    "UnitCause",
    "UnitVerdict",
    "assess",
    "default_connection_max_w",
    "default_limit_margin_w",
    "default_max_load_step_w",
    "screen_guard_input",
    "settings_for_site",
    "soc_resolution",
]

# Reading extras that are a counter the unit itself increments (SunSpec 802.Hb).
HEARTBEAT_FIELDS = ("battery_heartbeat",)
# The smallest power mismatch (W) taken as a unit not following its command (meter-grade noise).
MIN_POWER_TOLERANCE_W = 100.0
# The finest SoC resolution believed (ratio): float registers still carry a BMS estimate.
_SOC_FLOOR = 1e-4


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


def _rating(env: DeviceEnvelope) -> float:
    return max(env.max_charge_w, env.max_discharge_w)


def default_connection_max_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """Twice the largest of the two limits and the batteries' total rating (W).

    The grid can exceed a limit by what the batteries stop covering; twice the largest of
    these is beyond anything the site can draw or feed and well inside a glitch.
    """
    total = sum(_rating(e) for e in envelopes)
    return 2.0 * max(import_limit_w, export_limit_w, total)


def default_max_load_step_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """A quarter of the largest of the two limits and the batteries' total rating (W)."""
    total = sum(_rating(e) for e in envelopes)
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


@dataclass(frozen=True, slots=True)
class _UnitTrack:
    last_mono: float | None = None
    last_cmd_w: float | None = None
    cmd_changed_mono: float | None = None
    soc_anchor: float | None = None  # the SoC reading at its last change
    energy_wh: float = 0.0  # |energy| moved since then, the smaller of command and report
    dsoc_lo: float = 0.0  # SoC change since then, pessimistic for the reserve
    dsoc_hi: float = 0.0  # ... and for the maximum SoC
    dsoc_expected: float = 0.0  # from the reported power (for drift)
    hb_value: float | None = None
    hb_changed_mono: float | None = None
    hb_counting: bool = False
    power_value: float | None = None  # the power register's last value
    power_static_since: float | None = None  # since when it has read exactly that
    power_gap_since: float | None = None  # first time since then the command was away from it
    held_since: float | None = None
    hold_dwell_s: float = 0.0
    hold_cause: UnitCause | None = None
    hold_detail: str = ""
    clean_since: float | None = None
    released_mono: float | None = None
    relapses: int = 0
    credible_soc: float | None = None


@dataclass(frozen=True, slots=True)
class _MeterTrack:
    net_w: float | None = None  # net load at the last accepted reading
    battery_w: float | None = None  # credible battery total at the last reading
    raw_w: float | None = None  # the last raw value
    pending_net_w: float | None = None  # an unconfirmed jump
    frozen_at_w: float | None = None  # the value a frozen meter is stuck at


@dataclass(frozen=True, slots=True)
class CredibilityState:
    """Everything the rules remember between cycles (start with ``CredibilityState()``)."""

    units: Mapping[str, _UnitTrack] = field(default_factory=dict)
    meter: _MeterTrack = _MeterTrack()


def _tolerance_w(cfg: CredibilitySettings, env: DeviceEnvelope) -> float:
    return max(MIN_POWER_TOLERANCE_W, cfg.power_tolerance_ratio * _rating(env))


def _expected_power(cmd: float, reading: BatteryReading) -> float:
    if reading.limits is None:
        return cmd
    return reading.limits.clamp(cmd)


def _power_mismatch(
    env: DeviceEnvelope, cmd: float, reading: BatteryReading, power: float, tol: float
) -> bool:
    want = _expected_power(cmd, reading)
    if env.can_charge and env.can_discharge:
        return abs(power - want) > tol
    if env.can_charge:  # a charge-rate limit: it may charge less, never more
        return power < want - tol
    return power > want + tol


def _integrate(
    track: _UnitTrack, env: DeviceEnvelope, cmd: float | None, power: float, dt: float
) -> tuple[float, float, float, float]:
    """Energy moved (Wh, for the frozen rule) and SoC changes (lo, hi, expected)."""
    c = power if cmd is None else cmd
    hours = dt / 3600.0
    cap = env.capacity_wh
    eta_c, eta_d = env.charge_efficiency, env.discharge_efficiency
    if cmd is not None and env.can_charge and env.can_discharge:
        # Told to move power: the SoC must follow, whatever the power register says (a unit
        # that honestly does not follow is caught by the power rule anyway).
        moved = abs(c) * (eta_c if c < 0 else 1.0)
    else:  # a charge-rate limit is an upper bound: only what it reports and was allowed counts
        same_sign = (c > 0) == (power > 0) and c != 0 and power != 0
        moved = min(abs(c), abs(power)) if same_sign else 0.0
        if power < 0:
            moved *= eta_c
    ch_c, ch_p = max(0.0, -c), max(0.0, -power)
    dis_c, dis_p = max(0.0, c), max(0.0, power)
    lo = (min(ch_c, ch_p) * eta_c - max(dis_c, dis_p) / eta_d) * hours / cap
    hi = (max(ch_c, ch_p) * eta_c - min(dis_c, dis_p) / eta_d) * hours / cap
    exp = (ch_p * eta_c - dis_p / eta_d) * hours / cap
    return (
        track.energy_wh + moved * hours,
        track.dsoc_lo + lo,
        track.dsoc_hi + hi,
        track.dsoc_expected + exp,
    )


_Finding = tuple[UnitCause, str] | None


def _check_heartbeat(
    cfg: CredibilitySettings, track: _UnitTrack, reading: BatteryReading, now: float
) -> tuple[_UnitTrack, _Finding]:
    """A heartbeat counter seen counting that stopped for ``heartbeat_stall_s``."""
    hb = next((reading.extras[n] for n in HEARTBEAT_FIELDS if n in reading.extras), None)
    if hb is None or not hb.valid or hb.value is None:
        return track, None
    if track.hb_value is None or hb.value != track.hb_value:
        counting = track.hb_counting or track.hb_value is not None
        return replace(track, hb_value=hb.value, hb_changed_mono=now, hb_counting=counting), None
    since = track.hb_changed_mono
    if track.hb_counting and since is not None and now - since >= cfg.heartbeat_stall_s:
        return track, (UnitCause.FROZEN_HEARTBEAT, f"heartbeat unchanged for {now - since:.0f} s")
    return track, None


def _check_power_register(
    cfg: CredibilitySettings,
    track: _UnitTrack,
    *,
    cmd: float | None,
    power: float,
    now: float,
    tol: float,
) -> tuple[_UnitTrack, _Finding]:
    """A power register reading exactly the same for ``settle_s`` although the command was
    away from it by more than the tolerance: frozen, even while the command keeps changing
    (which the settled comparison alone would never see)."""
    if track.power_value is None or power != track.power_value:
        return replace(track, power_value=power, power_static_since=now, power_gap_since=None), None
    if cmd is None or abs(cmd - power) <= tol:
        # Told what it reads (a held unit told 0 W reads exactly 0 W): no gap, whatever came
        # before; otherwise a unit once caught could never be released.
        return replace(track, power_gap_since=None), None
    if track.power_gap_since is None:
        track = replace(track, power_gap_since=now)
    since = track.power_gap_since
    if since is not None and now - since >= cfg.settle_s:
        detail = (
            f"power register stuck at {power:.0f} W for {now - since:.0f} s while told otherwise"
        )
        return track, (UnitCause.POWER_MISMATCH, detail)
    return track, None


def _reanchor(track: _UnitTrack, soc: float) -> _UnitTrack:
    return replace(
        track, soc_anchor=soc, energy_wh=0.0, dsoc_lo=0.0, dsoc_hi=0.0, dsoc_expected=0.0
    )


def _check_soc(
    cfg: CredibilitySettings,
    track: _UnitTrack,
    env: DeviceEnvelope,
    *,
    cmd: float | None,
    soc: float,
    power: float,
    now: float,
    resolution: float,
) -> tuple[_UnitTrack, _Finding]:
    """Frozen SoC (energy moved beyond its resolution) and SoC drift (moved, but not so)."""
    if track.soc_anchor is None or track.last_mono is None:
        return _reanchor(track, soc), None
    dt = max(0.0, now - track.last_mono)
    # ``cmd`` is what was in force over the interval just past (written last cycle).
    energy, lo, hi, exp = _integrate(track, env, cmd, power, dt)
    track = replace(track, energy_wh=energy, dsoc_lo=lo, dsoc_hi=hi, dsoc_expected=exp)
    step = max(resolution, _SOC_FLOOR)
    anchor = track.soc_anchor
    assert anchor is not None
    if soc != anchor:
        observed = soc - anchor
        drift = observed - track.dsoc_expected
        allowed = 2.0 * step + cfg.soc_tolerance + 0.1 * abs(track.dsoc_expected)
        finding: _Finding = None
        if abs(drift) > allowed:
            detail = f"SoC moved {observed:+.3f}, the energy moved says {track.dsoc_expected:+.3f}"
            finding = (UnitCause.SOC_DRIFT, detail)
        return _reanchor(track, soc), finding
    threshold_wh = (cfg.frozen_soc_steps * step + cfg.soc_tolerance) * env.capacity_wh
    if track.energy_wh > threshold_wh:
        detail = (
            f"SoC stuck at {soc:.3f} after {track.energy_wh:.0f} Wh moved "
            f"(resolution {step * env.capacity_wh:.0f} Wh)"
        )
        return replace(track, energy_wh=0.0), (UnitCause.FROZEN_SOC, detail)  # count afresh
    return track, None


def _assess_unit(
    cfg: CredibilitySettings,
    track: _UnitTrack,
    env: DeviceEnvelope,
    *,
    reading: BatteryReading | None,
    cmd: float | None,
    now: float,
    resolution: float,
) -> tuple[_UnitTrack, UnitVerdict]:
    tol = _tolerance_w(cfg, env)
    # A new command (beyond the tolerance) starts a new settling time.
    last = track.last_cmd_w
    if cmd != last and (cmd is None or last is None or abs(cmd - last) > tol):
        track = replace(track, cmd_changed_mono=now)
    track = replace(track, last_cmd_w=cmd)
    settled = track.cmd_changed_mono is not None and now - track.cmd_changed_mono >= cfg.settle_s

    soc = reading.soc.value if reading is not None and reading.soc.valid else None
    power = reading.power_w.value if reading is not None and reading.power_w.valid else None
    if reading is None or not reading.available or soc is None or power is None:
        # The device layer holds it (stale/invalid/unavailable); restart the physics on return.
        track = replace(track, last_mono=None, soc_anchor=None, clean_since=None, power_value=None)
        return track, _verdict(cfg, track, env, reading=None, now=now, settled=settled)

    track, hb_finding = _check_heartbeat(cfg, track, reading, now)
    track, soc_finding = _check_soc(
        cfg, track, env, cmd=cmd, soc=soc, power=power, now=now, resolution=resolution
    )
    power_finding: _Finding = None
    if cmd is not None and settled and _power_mismatch(env, cmd, reading, power, tol):
        power_finding = (UnitCause.POWER_MISMATCH, f"reads {power:.0f} W, told {cmd:.0f} W")
    track, stuck = _check_power_register(cfg, track, cmd=cmd, power=power, now=now, tol=tol)
    power_finding = power_finding or stuck
    finding = hb_finding or power_finding or soc_finding

    track = replace(track, last_mono=now)
    # Readings within a settling time prove nothing: they neither hold nor release.
    track = _hold(cfg, track, finding, now, verified=cmd is None or settled)
    if track.held_since is None:
        # The pessimistic SoC of its last credible read: what a held unit is judged by.
        anchor = track.soc_anchor if track.soc_anchor is not None else soc
        track = replace(track, credible_soc=max(0.0, min(soc, anchor + track.dsoc_lo)))
    return track, _verdict(cfg, track, env, reading=reading, now=now, settled=settled)


def _hold(
    cfg: CredibilitySettings,
    track: _UnitTrack,
    finding: _Finding,
    now: float,
    *,
    verified: bool,
) -> _UnitTrack:
    """The hold/dwell state machine: held on any failure, released after a clean dwell."""
    if finding is not None:
        cause, detail = finding
        if track.held_since is None:
            relapse = (
                track.released_mono is not None and now - track.released_mono < cfg.max_dwell_s
            )
            relapses = track.relapses + 1 if relapse else 0
            dwell = min(cfg.dwell_s * 2.0**relapses, cfg.max_dwell_s)
            track = replace(track, held_since=now, hold_dwell_s=dwell, relapses=relapses)
        return replace(track, hold_cause=cause, hold_detail=detail, clean_since=None)
    if track.held_since is None:
        return track
    if not verified:
        return track
    clean_since = track.clean_since if track.clean_since is not None else now
    if now - clean_since >= track.hold_dwell_s:
        return replace(
            track,
            held_since=None,
            hold_cause=None,
            hold_detail="",
            clean_since=None,
            released_mono=now,
        )
    return replace(track, clean_since=clean_since)


def _verdict(
    cfg: CredibilitySettings,
    track: _UnitTrack,
    env: DeviceEnvelope,
    *,
    reading: BatteryReading | None,
    now: float,
    settled: bool,
) -> UnitVerdict:
    if track.held_since is not None:
        if now - track.held_since < cfg.settle_s:
            band = (-env.max_charge_w, env.max_discharge_w)
        else:
            band = (0.0, 0.0)
        s = track.credible_soc
        return UnitVerdict(
            credible=False,
            cause=track.hold_cause,
            detail=track.hold_detail,
            held_since_mono=track.held_since,
            dwell_s=track.hold_dwell_s,
            power_band_w=band,
            soc_band=(s, s) if s is not None else None,
        )
    soc = reading.soc.value if reading is not None else None
    power = reading.power_w.value if reading is not None else None
    if soc is None or power is None:
        return UnitVerdict(credible=True)
    power_band: tuple[float, float] | None = None
    if not settled and track.last_cmd_w is not None:
        cmd = track.last_cmd_w
        power_band = (min(power, cmd), max(power, cmd))
    anchor = track.soc_anchor if track.soc_anchor is not None else soc
    lo = min(soc, anchor + track.dsoc_lo)
    hi = max(soc, anchor + track.dsoc_hi)
    return UnitVerdict(
        credible=True,
        power_band_w=power_band,
        soc_band=(min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)),
    )


def _assess_meter(
    cfg: CredibilitySettings,
    track: _MeterTrack,
    grid: float | None,
    battery_w: float,
    hidden_move_w: float,
) -> tuple[_MeterTrack, MeterVerdict]:
    if grid is None or not math.isfinite(grid):
        verdict = MeterVerdict(False, None, MeterCause.NO_READING, "no valid meter reading")
        return replace(track, pending_net_w=None), verdict
    if abs(grid) > cfg.connection_max_w:
        detail = f"{grid:.0f} W is beyond the connection's +-{cfg.connection_max_w:.0f} W"
        return track, MeterVerdict(False, None, MeterCause.OUT_OF_RANGE, detail)
    # A repeated reading hides what the batteries did since: more than the margin the guard
    # keeps inside the tighter limit, and a limit could be crossed unseen.
    moved = track.battery_w is not None and abs(battery_w - track.battery_w) > max(
        hidden_move_w, MIN_POWER_TOLERANCE_W
    )
    if track.frozen_at_w is not None and grid == track.frozen_at_w:
        detail = f"stuck at {grid:.0f} W"
        return replace(track, battery_w=battery_w), MeterVerdict(
            False, None, MeterCause.FROZEN, detail
        )
    if track.raw_w is not None and grid == track.raw_w and moved:
        detail = f"stuck at {grid:.0f} W while the batteries moved"
        new = replace(track, frozen_at_w=grid, battery_w=battery_w, pending_net_w=None)
        return new, MeterVerdict(False, None, MeterCause.FROZEN, detail)
    track = replace(track, frozen_at_w=None, raw_w=grid, battery_w=battery_w)
    net = grid + battery_w
    unconfirmed = _unconfirmed(cfg, track, net)
    if unconfirmed is not None:
        return replace(track, pending_net_w=net), MeterVerdict(
            False, None, MeterCause.UNCONFIRMED_JUMP, unconfirmed
        )
    return replace(track, net_w=net, pending_net_w=None), MeterVerdict(True, grid)


def _unconfirmed(cfg: CredibilitySettings, track: _MeterTrack, net: float) -> str | None:
    """Why the net load ``net`` must wait for the next reading to confirm it, or None.

    A jump beyond a load step must be confirmed by a next reading close to it. The first
    reading after start has no history to be checked against and is taken as it is (a glitch
    exactly then steers one cycle; the range check still applies).
    """
    pending = track.pending_net_w
    if track.net_w is None or abs(net - track.net_w) <= cfg.max_load_step_w:
        return None
    if pending is None or abs(net - pending) > cfg.max_load_step_w / 2.0:
        return (
            f"net load jumped {net - track.net_w:+.0f} W (max step "
            f"{cfg.max_load_step_w:.0f} W): waiting for a second reading"
        )
    return None


def assess(
    cfg: CredibilitySettings, state: CredibilityState, inp: CredibilityInput
) -> tuple[CredibilityState, CredibilityReport]:
    """Judge one cycle's readings; returns the state for the next cycle and the verdicts."""
    tracks: dict[str, _UnitTrack] = {}
    verdicts: dict[str, UnitVerdict] = {}
    for dev_id, env in inp.envelopes.items():
        track, verdict = _assess_unit(
            cfg,
            state.units.get(dev_id, _UnitTrack()),
            env,
            reading=inp.readings.get(dev_id),
            cmd=inp.commanded_w.get(dev_id),
            now=inp.now_mono,
            resolution=inp.soc_resolution.get(dev_id, 0.01),
        )
        tracks[dev_id], verdicts[dev_id] = track, verdict
    # The batteries' best estimate for the meter's net load: a settling unit at the middle of
    # its band (its reading may lag or be stuck, its command may not be reached yet).
    battery_w = 0.0
    for dev_id, v in verdicts.items():
        r = inp.readings.get(dev_id)
        if not v.credible or r is None or not r.power_w.valid or r.power_w.value is None:
            continue
        band = v.power_band_w
        battery_w += r.power_w.value if band is None else (band[0] + band[1]) / 2.0
    hidden = min(
        side_margin(cfg.limit_margin_w, inp.import_limit_w),
        side_margin(cfg.limit_margin_w, inp.export_limit_w),
    )
    meter_track, meter = _assess_meter(cfg, state.meter, inp.grid_power_w, battery_w, hidden)
    report = CredibilityReport(verdicts, meter, cfg.limit_margin_w)
    return CredibilityState(tracks, meter_track), report


def screen_guard_input(inp: GuardInput, report: CredibilityReport) -> GuardInput:
    """``inp`` as the guard may believe it: units not credible unhealthy, their power and SoC
    replaced, the meter dropped when implausible, the limit margin and power bands added."""
    readings: dict[str, BatteryReading] = dict(inp.readings)
    healthy = dict(inp.healthy)
    bands: dict[str, tuple[float, float]] = dict(inp.power_band_w)
    soc_bands: dict[str, tuple[float, float]] = dict(inp.soc_band)
    for dev_id, v in report.units.items():
        if v.power_band_w is not None:
            bands[dev_id] = v.power_band_w
        if v.soc_band is not None:
            soc_bands[dev_id] = v.soc_band
        r = readings.get(dev_id)
        if v.credible or r is None:
            continue
        healthy[dev_id] = False
        why = f"not credible: {v.cause.value if v.cause else 'held'}"
        soc = r.soc
        if v.soc_band is not None:
            soc = Reading(v.soc_band[0], r.soc.unit, r.soc.read_at_mono)
        readings[dev_id] = replace(
            r,
            soc=soc,
            power_w=Reading(r.power_w.value, r.power_w.unit, r.read_at_mono, Quality.STALE, why),
        )
    return replace(
        inp,
        readings=readings,
        healthy=healthy,
        grid_power_w=report.meter.grid_power_w,
        limit_margin_w=max(inp.limit_margin_w, report.limit_margin_w),
        power_band_w=bands,
        soc_band=soc_bands,
    )


@dataclass(frozen=True, slots=True)
class Screened:
    """A screened guard input and the report it came from."""

    guard_input: GuardInput
    report: CredibilityReport


class CredibilityMonitor:
    """Keeps the credibility state across cycles; the rules themselves are :func:`assess`."""

    def __init__(
        self, settings: CredibilitySettings, soc_resolution: Mapping[str, float] | None = None
    ) -> None:
        self.settings = settings
        self.soc_resolution = dict(soc_resolution or {})
        self.state = CredibilityState()
        self.last: CredibilityReport | None = None

    def screen(self, inp: GuardInput, commanded_w: Mapping[str, float | None]) -> Screened:
        """Judge this cycle's readings and return what the guard may believe."""
        self.state, report = assess(
            self.settings,
            self.state,
            CredibilityInput(
                now_mono=inp.now_mono,
                envelopes=inp.envelopes,
                readings=inp.readings,
                commanded_w=commanded_w,
                grid_power_w=inp.grid_power_w,
                soc_resolution=self.soc_resolution,
                import_limit_w=inp.import_limit_w,
                export_limit_w=inp.export_limit_w,
            ),
        )
        self.last = report
        return Screened(screen_guard_input(inp, report), report)
