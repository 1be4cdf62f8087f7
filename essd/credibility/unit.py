"""The credibility rules for one storage unit: frozen by physics, power against command,
SoC drift, heartbeat, and the hold with its dwell (see :mod:`essd.credibility`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from essd.credibility.types import (
    HEARTBEAT_FIELDS,
    MIN_POWER_TOLERANCE_W,
    CredibilitySettings,
    UnitCause,
    UnitVerdict,
    rating,
)
from essd.domain import BatteryReading
from essd.safety import DeviceEnvelope

# The finest SoC resolution believed (ratio): float registers still carry a BMS estimate.
_SOC_FLOOR = 1e-4


@dataclass(frozen=True, slots=True)
class UnitTrack:
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


def _tolerance_w(cfg: CredibilitySettings, env: DeviceEnvelope) -> float:
    return max(MIN_POWER_TOLERANCE_W, cfg.power_tolerance_ratio * rating(env))


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
    track: UnitTrack, env: DeviceEnvelope, cmd: float | None, power: float, dt: float
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
    cfg: CredibilitySettings, track: UnitTrack, reading: BatteryReading, now: float
) -> tuple[UnitTrack, _Finding]:
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
    track: UnitTrack,
    *,
    cmd: float | None,
    power: float,
    now: float,
    tol: float,
) -> tuple[UnitTrack, _Finding]:
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


def _reanchor(track: UnitTrack, soc: float) -> UnitTrack:
    return replace(
        track, soc_anchor=soc, energy_wh=0.0, dsoc_lo=0.0, dsoc_hi=0.0, dsoc_expected=0.0
    )


def _check_soc(
    cfg: CredibilitySettings,
    track: UnitTrack,
    env: DeviceEnvelope,
    *,
    cmd: float | None,
    soc: float,
    power: float,
    now: float,
    resolution: float,
) -> tuple[UnitTrack, _Finding]:
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


def assess_unit(
    cfg: CredibilitySettings,
    track: UnitTrack,
    env: DeviceEnvelope,
    *,
    reading: BatteryReading | None,
    cmd: float | None,
    now: float,
    resolution: float,
) -> tuple[UnitTrack, UnitVerdict]:
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
    cfg: CredibilitySettings, track: UnitTrack, finding: _Finding, now: float, *, verified: bool
) -> UnitTrack:
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
    track: UnitTrack,
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
