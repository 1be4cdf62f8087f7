"""The safety supervisor: every setpoint passes here before it reaches a device.

Invariants held on every path (DESIGN.md "Safety invariants"):
- never beyond min(profile rating, live BMS limit, configured limit), per direction;
- never discharge below the reserve SoC nor charge above the maximum SoC — and, because a
  setpoint may live for its whole TTL if essd dies, the energy a setpoint could move over its
  TTL must not cross those bounds either;
- a device whose data is stale, invalid, unavailable or in fault is held at 0 W;
- ramp limits (W/s) on every change, except where a safety clamp must act at once;
- site import and export limits, corrected in closed loop from the meter each cycle, kept
  ``limit_margin_w`` inside each limit (meter error, a load step within one cycle), at most
  5 % of that limit plus 100 W (so a zero-export site keeps 100 W of import, not 3 % of its
  import limit);
  without a valid meter reading the limits cannot be verified, so every device idles;
- a unit whose present power is uncertain (``power_band_w``, from essd.credibility) counts at
  the pessimistic end of its band for each limit; when the bands together are wider than the
  window between the limits, no setpoint can be vouched for and every device idles;
- where a SoC interval is given (``soc_band``), the reserve is checked against its low end
  and the maximum SoC against its high end;
- with a demand charge, charging never takes the import above ``charge_import_cap_w`` (the
  billed peak so far, or the higher import the plan accepted for this step): it is reduced,
  never turned into discharge (that is the plan's call).

Battery power in W: > 0 discharges into the site, < 0 charges. Grid W > 0 imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from essd.domain import BatteryReading, LiveLimits, Setpoint

# Below this a command is treated as idle (W); avoids writing noise to device flash.
EPSILON_W = 1.0
# The margin inside a limit is never more than 5 % of that limit plus this (W).
SIDE_MARGIN_FLOOR_W = 100.0


@dataclass(frozen=True, slots=True)
class DeviceEnvelope:
    """The static safety envelope of one storage unit (from its profile and the config).

    ``max_charge_w``/``max_discharge_w`` are magnitudes (min of rating and configuration).
    ``can_discharge`` is False for units without a discharge setpoint (portable: only a
    charge-rate limit); ``can_charge`` False for units that cannot be told to charge.
    """

    device_id: str
    capacity_wh: float
    max_charge_w: float
    max_discharge_w: float
    reserve_soc: float
    max_soc: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    can_charge: bool = True
    can_discharge: bool = True
    ramp_w_per_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.reserve_soc < self.max_soc <= 1.0:
            raise ValueError(f"{self.device_id}: need 0 <= reserve_soc < max_soc <= 1")
        if self.capacity_wh <= 0:
            raise ValueError(f"{self.device_id}: capacity_wh must be > 0")


@dataclass(frozen=True, slots=True)
class GuardInput:
    """Everything the guard needs for one cycle.

    ``desired_w``: what the plan (or a manual command) asks per device. ``healthy``: False for
    devices whose data is stale/invalid/unavailable/in fault. ``previous_w``: what each device
    was last commanded (for ramps). ``grid_power_w``: the meter now (None = not valid).
    ``limit_margin_w``: kept inside both site limits (W >= 0). ``power_band_w``: per device,
    (lo, hi) W its power now may be in, used instead of its reading for the site balance.
    ``soc_band``: per device, (lo, hi) ratio its SoC may be in, instead of its reading.
    ``charge_import_cap_w``: import (W) that charging must not push the grid above (None:
    no such cap); see the module docstring.
    """

    now_mono: float
    dt_s: float
    ttl_s: float
    envelopes: Mapping[str, DeviceEnvelope]
    readings: Mapping[str, BatteryReading]
    healthy: Mapping[str, bool]
    desired_w: Mapping[str, float]
    previous_w: Mapping[str, float]
    grid_power_w: float | None
    import_limit_w: float
    export_limit_w: float
    source: str = "optimizer"
    limit_margin_w: float = 0.0
    power_band_w: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    soc_band: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    charge_import_cap_w: float | None = None


@dataclass(frozen=True, slots=True)
class GuardResult:
    """Guarded setpoints and why each one differs from the request."""

    setpoints: Mapping[str, Setpoint]
    reasons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    predicted_grid_w: float | None = None
    site_limit_unmet_w: float = 0.0


@dataclass(slots=True)
class _Bounds:
    lo: float  # most charging allowed (<= 0)
    hi: float  # most discharging allowed (>= 0)
    reasons: list[str]


def _device_bounds(
    env: DeviceEnvelope,
    reading: BatteryReading,
    ttl_s: float,
    soc_band: tuple[float, float] | None = None,
) -> _Bounds:
    """[lo, hi] in battery sign from ratings, live limits, capability and the SoC window."""
    reasons: list[str] = []
    limits = LiveLimits(env.max_charge_w, env.max_discharge_w)
    if reading.limits is not None:
        limits = limits.tighten(reading.limits)
    lo, hi = -limits.max_charge_w, limits.max_discharge_w
    if not env.can_discharge:
        hi = 0.0
    if not env.can_charge:
        lo = 0.0
    soc = reading.soc.value
    assert soc is not None  # healthy devices have a valid SoC
    soc_lo, soc_hi = (soc, soc) if soc_band is None else (min(soc_band), max(soc_band))
    hours = ttl_s / 3600.0
    # Energy a setpoint may move over its whole TTL without crossing the SoC window.
    dis_wh = max(0.0, (soc_lo - env.reserve_soc) * env.capacity_wh * env.discharge_efficiency)
    ch_wh = max(0.0, (env.max_soc - soc_hi) * env.capacity_wh / env.charge_efficiency)
    if dis_wh / hours < hi:
        hi = dis_wh / hours
        reasons.append("reserve")
    if ch_wh / hours < -lo:
        lo = -ch_wh / hours
        reasons.append("max_soc")
    return _Bounds(lo=min(lo, 0.0), hi=max(hi, 0.0), reasons=reasons)


def guard(inp: GuardInput) -> GuardResult:
    """Turn requested powers into safe setpoints (see the module docstring for the rules)."""
    bounds: dict[str, _Bounds] = {}
    power: dict[str, float] = {}
    for dev_id, env in inp.envelopes.items():
        reading = inp.readings.get(dev_id)
        ok = (
            inp.healthy.get(dev_id, False)
            and reading is not None
            and reading.available
            and reading.soc.valid
        )
        if not ok or reading is None:
            bounds[dev_id] = _Bounds(0.0, 0.0, ["unhealthy"])
            power[dev_id] = 0.0
            continue
        b = _device_bounds(env, reading, inp.ttl_s, inp.soc_band.get(dev_id))
        want = inp.desired_w.get(dev_id, 0.0)
        if not math.isfinite(want):
            want = 0.0
            b.reasons.append("non-finite request")
        prev = inp.previous_w.get(dev_id, 0.0)
        if env.ramp_w_per_s is not None:
            step = env.ramp_w_per_s * inp.dt_s
            ramped = min(max(want, prev - step), prev + step)
            if ramped != want:
                b.reasons.append("ramp")
            want = ramped
        clamped = min(max(want, b.lo), b.hi)  # after the ramp: a safety clamp acts at once
        if clamped != want:
            b.reasons.append("limit")
        bounds[dev_id] = b
        power[dev_id] = clamped

    predicted, unmet = _site_correction(inp, bounds, power)

    setpoints: dict[str, Setpoint] = {}
    reasons: dict[str, tuple[str, ...]] = {}
    for dev_id, p in power.items():
        value = 0.0 if abs(p) < EPSILON_W else p
        setpoints[dev_id] = Setpoint(
            device_id=dev_id,
            power_w=value,
            issued_at_mono=inp.now_mono,
            ttl_s=inp.ttl_s,
            source=inp.source if "unhealthy" not in bounds[dev_id].reasons else "safe",
        )
        if bounds[dev_id].reasons:
            reasons[dev_id] = tuple(dict.fromkeys(bounds[dev_id].reasons))
    return GuardResult(setpoints, reasons, predicted, unmet)


def _site_correction(
    inp: GuardInput, bounds: dict[str, _Bounds], power: dict[str, float]
) -> tuple[float | None, float]:
    """Adjust ``power`` in place so the predicted grid power stays within the site limits.

    grid = load - pv - sum(battery), so with the meter's grid G and the batteries' measured
    power B, the grid after the new setpoints P is G + sum(B) - sum(P), held ``limit_margin_w``
    inside each limit; where B is only known as a band, each limit is checked at the band's
    pessimistic end. Returns the prediction (the band's middle) and how far a limit is still
    exceeded when no device has headroom left (0 when met).
    """
    if inp.grid_power_w is None or not math.isfinite(inp.grid_power_w):
        for dev_id in power:
            power[dev_id] = 0.0
            bounds[dev_id].reasons.append("no valid meter")
        return None, 0.0
    lo_sum = hi_sum = 0.0
    for dev_id in power:
        band = inp.power_band_w.get(dev_id)
        reading = inp.readings.get(dev_id)
        if band is not None:
            lo_sum += min(band)
            hi_sum += max(band)
        elif reading is not None and reading.power_w.valid and reading.power_w.value is not None:
            lo_sum += reading.power_w.value
            hi_sum += reading.power_w.value
    # The site's net load, batteries excluded, at each end of what their power may be.
    base_lo, base_hi = inp.grid_power_w + lo_sum, inp.grid_power_w + hi_sum
    margin = min(max(inp.limit_margin_w, 0.0), (inp.import_limit_w + inp.export_limit_w) / 4.0)
    import_at = inp.import_limit_w - side_margin(margin, inp.import_limit_w)
    export_at = inp.export_limit_w - side_margin(margin, inp.export_limit_w)

    def grid(base: float) -> float:
        return base - sum(power.values())

    if base_hi - base_lo > import_at + export_at:
        # Uncertain battery power wider than the window between the limits: no setpoint can be
        # vouched for in both directions, so none is issued.
        for dev_id in power:
            power[dev_id] = 0.0
            bounds[dev_id].reasons.append("unknown battery power")
    else:
        # Too much import: less charging first, then more discharging.
        _shift(power, bounds, grid(base_hi) - import_at, up=True, reason="import limit")
        # Too much export: less discharging first, then more charging.
        _shift(power, bounds, -export_at - grid(base_lo), up=False, reason="export limit")
        cap = inp.charge_import_cap_w
        if cap is not None and math.isfinite(cap):
            # Charging that would raise the billed peak: less of it, never towards export.
            excess = min(grid(base_hi) - max(cap, 0.0), grid(base_lo) + export_at)
            _shift(power, bounds, excess, up=True, reason="billed peak", undo_only=True)
    g_lo, g_hi = grid(base_lo), grid(base_hi)
    unmet = max(0.0, g_hi - inp.import_limit_w, -inp.export_limit_w - g_lo)
    return (g_lo + g_hi) / 2.0, unmet


def side_margin(margin: float, limit_w: float) -> float:
    """The margin held inside one limit: at most 5 % of that limit plus 100 W.

    A site-wide margin sized for a 120 kW import limit would otherwise make a zero-export
    site import kilowatts for nothing; 100 W covers a class-1 meter's error near zero.
    """
    return min(margin, 0.05 * limit_w + SIDE_MARGIN_FLOOR_W)


def _shift(
    power: dict[str, float],
    bounds: dict[str, _Bounds],
    amount: float,
    *,
    up: bool,
    reason: str,
    undo_only: bool = False,
) -> None:
    """Move the devices' total power by ``amount`` W (up = toward discharge), within bounds.

    The first pass only brings devices back toward 0 (undoing charge when moving up, discharge
    when moving down); the second, unless ``undo_only``, uses the remaining headroom. Devices
    go in id order, so the result is deterministic.
    """
    for first_pass in (True,) if undo_only else (True, False):
        for dev_id in sorted(power):
            if amount <= 0:
                return
            b, p = bounds[dev_id], power[dev_id]
            if up:
                if first_pass and p >= 0:
                    continue
                target = min(0.0, b.hi) if first_pass else b.hi
                delta = min(max(0.0, target - p), amount)
                power[dev_id] = p + delta
            else:
                if first_pass and p <= 0:
                    continue
                target = max(0.0, b.lo) if first_pass else b.lo
                delta = min(max(0.0, p - target), amount)
                power[dev_id] = p - delta
            if delta > 0:
                amount -= delta
                b.reasons.append(reason)
