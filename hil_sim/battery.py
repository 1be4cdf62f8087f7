"""Battery physics of a simulated storage unit: energy, SoC, limits, temperature, faults.

Sign convention: battery power in W, **> 0 discharges into the site, < 0 charges**. Energy in Wh,
SoC a ratio 0..1, temperature in °C.

The model, per unit:

- stored energy ``E`` (Wh) in ``[0, capacity]``; charging stores ``eta_c * |P|``, discharging
  draws ``|P| / eta_d`` from the cells; self-discharge is exponential at a daily rate;
- power limits (the live BMS limits) taper linearly to 0 within ``taper_soc`` of empty and full,
  derate linearly from ``derate_start_c`` to 0 at ``trip_c``, are 0 outside the unit's own SoC
  window, and 0 while the over-temperature trip is latched (alarm bit set); the trip clears
  once the cells cool below ``derate_start_c`` (hysteresis, as a BMS does);
- a first-order thermal model: ``C dT/dt = losses - (T - T_ambient) / R``, the losses being the
  conversion losses of the power that flows.

Integration is lazy: nothing runs in the background. Whenever the battery is touched, it
advances from its last update to ``clock.now()`` in sub-steps short enough to resolve the taper
and the thermal time constant, so a stepped :class:`essd.clock.SimClock` that jumps an hour works
as well as a running one. Within each sub-step the delivered power is the command clamped to the
limits at the start of the sub-step, and a sub-step that would cross a SoC bound is cut at the
bound, so SoC never leaves ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntFlag

from drivers.profile import Profile
from essd.clock import Clock
from essd.domain import LiveLimits


def _clip(x: float, lo: float, hi: float) -> float:
    # Plain floats: this runs thousands of times per simulated day, numpy scalars are slower.
    return lo if x < lo else hi if x > hi else x


_SECONDS_PER_DAY = 86_400.0
_MAX_STEP_S = 60.0  # resolves the thermal time constant (R*C is typically an hour)
_MIN_TAPER_RESOLUTION = 0.005  # smallest SoC change a sub-step is cut to


class Alarm(IntFlag):
    """Alarm bits a simulated BMS publishes in its alarm word."""

    NONE = 0
    OVER_TEMPERATURE = 1  # trip latched: limits are 0
    DERATING = 2  # temperature above derate_start_c: limits reduced
    EMPTY = 4  # at or below the lower SoC bound
    FULL = 8  # at or above the upper SoC bound
    FORCED_FAULT = 16  # a fault injected by the test timeline


@dataclass(frozen=True, slots=True)
class BatteryParams:
    """Physical parameters of one simulated unit (W, Wh, ratios, °C, J/K, K/W)."""

    capacity_wh: float
    max_charge_w: float
    max_discharge_w: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    self_discharge_per_day: float = 0.001
    taper_soc: float = 0.1
    ambient_c: float = 25.0
    thermal_capacity_j_per_k: float = 200_000.0
    thermal_resistance_k_per_w: float = 0.02
    derate_start_c: float = 45.0
    trip_c: float = 60.0

    def __post_init__(self) -> None:
        checks = {
            "capacity_wh": self.capacity_wh > 0,
            "max_charge_w": self.max_charge_w >= 0,
            "max_discharge_w": self.max_discharge_w >= 0,
            "charge_efficiency": 0 < self.charge_efficiency <= 1,
            "discharge_efficiency": 0 < self.discharge_efficiency <= 1,
            "self_discharge_per_day": 0 <= self.self_discharge_per_day < 1,
            "taper_soc": 0 <= self.taper_soc <= 0.5,
            "thermal_capacity_j_per_k": self.thermal_capacity_j_per_k > 0,
            "thermal_resistance_k_per_w": self.thermal_resistance_k_per_w > 0,
            "trip_c": self.trip_c > self.derate_start_c,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"{name}: out of range ({value!r})")

    @classmethod
    def from_profile(
        cls,
        profile: Profile,
        *,
        capacity_wh: float | None = None,
        max_charge_w: float | None = None,
        max_discharge_w: float | None = None,
    ) -> BatteryParams:
        """Parameters from a profile's ``ratings`` and ``simulation`` sections.

        The overrides come from the site config (a site may carry a bigger battery stack than
        the profile's nameplate); a profile without a capacity gets 1 kWh so it still simulates.
        """
        r, s = profile.ratings, profile.simulation
        return cls(
            capacity_wh=capacity_wh or r.capacity_wh or 1000.0,
            max_charge_w=r.max_charge_w if max_charge_w is None else max_charge_w,
            max_discharge_w=r.max_discharge_w if max_discharge_w is None else max_discharge_w,
            charge_efficiency=r.charge_efficiency,
            discharge_efficiency=r.discharge_efficiency,
            self_discharge_per_day=s.self_discharge_per_day,
            taper_soc=s.taper_soc,
            ambient_c=s.ambient_c,
            thermal_capacity_j_per_k=s.thermal_capacity_j_per_k,
            thermal_resistance_k_per_w=s.thermal_resistance_k_per_w,
            derate_start_c=s.derate_start_c,
            trip_c=s.trip_c,
        )


@dataclass(frozen=True, slots=True)
class BatteryState:
    """The true state of a unit at ``time`` (epoch seconds of the sim clock).

    ``power_w``: > 0 discharges into the site, < 0 charges (what flows now, after limits).
    ``limits``: the live BMS limits (magnitudes >= 0). Energy counters are totals since start:
    ``charged_wh`` taken from the site, ``discharged_wh`` delivered to it, ``self_discharge_wh``
    lost in the cells; ``max_overshoot_w`` is the largest amount by which delivered power ever
    exceeded the limits in force (0 unless the model is wrong: the tests check it).
    """

    time: float
    soc: float
    energy_wh: float
    power_w: float
    commanded_w: float
    limits: LiveLimits
    temperature_c: float
    alarms: Alarm
    charged_wh: float
    discharged_wh: float
    self_discharge_wh: float
    max_overshoot_w: float


class Battery:
    """One simulated unit, advanced lazily to ``clock.now()`` whenever it is touched."""

    def __init__(self, params: BatteryParams, clock: Clock, *, initial_soc: float = 0.5) -> None:
        if not 0.0 <= initial_soc <= 1.0:
            raise ValueError(f"initial_soc: must be within 0..1, got {initial_soc!r}")
        self.params = params
        self._clock = clock
        self._t = clock.now()
        self._energy = initial_soc * params.capacity_wh
        self._temp = params.ambient_c
        self._command = 0.0
        self._tripped = False
        self._forced_fault = False
        self._soc_min = 0.0
        self._soc_max = 1.0
        self._charge_cap_w = math.inf  # caps set through the device (charge-rate register...)
        self._discharge_cap_w = math.inf
        self._charged = 0.0
        self._discharged = 0.0
        self._self_loss = 0.0
        self._overshoot = 0.0
        p = params
        self._self_rate = -math.log1p(-p.self_discharge_per_day) / _SECONDS_PER_DAY
        self._tau = p.thermal_capacity_j_per_k * p.thermal_resistance_k_per_w

    # ---- commands -----------------------------------------------------------------------

    def command(self, power_w: float, *, at: float | None = None) -> None:
        """Ask for ``power_w`` from ``at`` (default now) on (> 0 discharges); limits decide
        what flows."""
        if not math.isfinite(power_w):
            raise ValueError(f"power_w: must be finite, got {power_w!r}")
        self.advance(at)
        self._command = float(power_w)

    @property
    def commanded_w(self) -> float:
        """The power last asked for (battery sign), before limits."""
        return self._command

    def set_soc_window(self, min_soc: float, max_soc: float, *, at: float | None = None) -> None:
        """The unit's own SoC window from ``at`` (default now): no discharge at or below
        ``min_soc``, no charge above ``max_soc``."""
        if not 0.0 <= min_soc <= max_soc <= 1.0:
            raise ValueError(f"soc window: need 0 <= min <= max <= 1, got {min_soc}, {max_soc}")
        self.advance(at)
        self._soc_min, self._soc_max = float(min_soc), float(max_soc)

    def set_power_caps(
        self,
        *,
        charge_w: float | None = None,
        discharge_w: float | None = None,
        at: float | None = None,
    ) -> None:
        """Caps on top of the BMS limits (a charge-rate setting, outputs off...) from ``at``
        (default now); None = no cap."""
        self.advance(at)
        self._charge_cap_w = math.inf if charge_w is None else max(0.0, charge_w)
        self._discharge_cap_w = math.inf if discharge_w is None else max(0.0, discharge_w)

    def set_forced_fault(self, active: bool, *, at: float | None = None) -> None:
        """Inject (or clear) a BMS over-temperature fault from ``at`` (default now): cells
        held above the trip point."""
        self.advance(at)
        self._forced_fault = active
        if active:
            self._temp = max(self._temp, self.params.trip_c + 2.0)
            self._tripped = True

    # ---- state --------------------------------------------------------------------------

    def state(self) -> BatteryState:
        """Advance to now and return the true state."""
        self.advance()
        limits = self._limits(self._energy, self._temp)
        return BatteryState(
            time=self._t,
            soc=self._energy / self.params.capacity_wh,
            energy_wh=self._energy,
            power_w=limits.clamp(self._command),
            commanded_w=self._command,
            limits=limits,
            temperature_c=self._temp,
            alarms=self._alarms(),
            charged_wh=self._charged,
            discharged_wh=self._discharged,
            self_discharge_wh=self._self_loss,
            max_overshoot_w=self._overshoot,
        )

    def _alarms(self) -> Alarm:
        p = self.params
        a = Alarm.NONE
        if self._tripped:
            a |= Alarm.OVER_TEMPERATURE
        elif self._temp > p.derate_start_c:
            a |= Alarm.DERATING
        if self._forced_fault:
            a |= Alarm.FORCED_FAULT
        soc = self._energy / p.capacity_wh
        if soc <= max(self._soc_min, 0.0) + 1e-9:
            a |= Alarm.EMPTY
        if soc >= min(self._soc_max, 1.0) - 1e-9:
            a |= Alarm.FULL
        return a

    def _limits(self, energy: float, temp: float) -> LiveLimits:
        p = self.params
        if self._tripped:
            return LiveLimits(0.0, 0.0)
        soc = energy / p.capacity_wh
        derate = _clip((p.trip_c - temp) / (p.trip_c - p.derate_start_c), 0.0, 1.0)
        if p.taper_soc > 0:
            up = _clip((1.0 - soc) / p.taper_soc, 0.0, 1.0)
            down = _clip(soc / p.taper_soc, 0.0, 1.0)
        else:
            up = 1.0 if soc < 1.0 else 0.0
            down = 1.0 if soc > 0.0 else 0.0
        charge = p.max_charge_w * up * derate if soc < self._soc_max else 0.0
        discharge = p.max_discharge_w * down * derate if soc > self._soc_min else 0.0
        return LiveLimits(min(charge, self._charge_cap_w), min(discharge, self._discharge_cap_w))

    # ---- integration --------------------------------------------------------------------

    def advance(self, until: float | None = None) -> None:
        """Integrate from the last update to ``until`` (epoch s, default ``clock.now()``).

        Times before the last update are a no-op: the model never goes back.
        """
        now = self._clock.now() if until is None else min(until, self._clock.now())
        remaining = now - self._t
        while remaining > 1e-9:
            remaining -= self._substep(remaining)
        self._t = max(self._t, now)

    def _substep(self, remaining: float) -> float:
        """Advance by at most ``remaining`` seconds; returns the time actually advanced."""
        p = self.params
        cap = p.capacity_wh
        limits = self._limits(self._energy, self._temp)
        power = limits.clamp(self._command)
        # Cells' energy rate in Wh/s: charging stores eta_c*|P|, discharging draws |P|/eta_d.
        if power < 0:
            rate = -power * p.charge_efficiency / 3600.0
            loss_w = -power * (1.0 - p.charge_efficiency)
        else:
            rate = -power / p.discharge_efficiency / 3600.0
            loss_w = power * (1.0 / p.discharge_efficiency - 1.0)

        h = remaining
        cut_at: float | None = None
        if power != 0.0:
            # Short steps while power flows, so the taper and the derating are resolved.
            h = min(h, _MAX_STEP_S, self._tau / 20.0)
        elif self._command != 0.0 or self._tripped:
            # Nothing flows, but it could start (the cells cool down, self-discharge leaves the
            # bound): steps of a fraction of the thermal time constant are fine enough.
            h = min(h, self._tau / 20.0)
        if rate != 0.0:
            band = max(p.taper_soc / 10.0, _MIN_TAPER_RESOLUTION)
            h = min(h, band * cap / abs(rate))
            # Cut the step at the SoC bound it would cross.
            bound = min(self._soc_max, 1.0) * cap if rate > 0 else max(self._soc_min, 0.0) * cap
            if (rate > 0 and self._energy + rate * h >= bound) or (
                rate < 0 and self._energy + rate * h <= bound
            ):
                h = max((bound - self._energy) / rate, 0.0)
                cut_at = bound
        if h <= 0.0:
            # Exactly at the bound with the limit not yet 0 (no taper): nothing can flow.
            self._energy = _clip(self._energy, 0.0, cap)
            return self._advance_idle(min(remaining, self._tau / 20.0))

        self._overshoot = max(
            self._overshoot, -power - limits.max_charge_w, power - limits.max_discharge_w
        )
        energy = self._energy + rate * h
        if power < 0:
            self._charged += -power * h / 3600.0
        elif power > 0:
            self._discharged += power * h / 3600.0
        if cut_at is not None:
            # Land exactly on the bound (no float creep past it); the self-discharge of this
            # short step is left out (it is re-applied from the bound in the next step).
            energy = cut_at
        else:
            # Self-discharge on the smaller of the energies at both ends of the step: it stays
            # below what a full battery would lose, and the energy stays >= 0.
            loss = min(self._energy, energy) * (1.0 - math.exp(-self._self_rate * h))
            self._self_loss += loss
            energy -= loss
        self._energy = _clip(energy, 0.0, cap)
        self._thermal(loss_w, h)
        self._t += h
        return h

    def _advance_idle(self, h: float) -> float:
        self._energy = self._self_discharge(self._energy, h)
        self._thermal(0.0, h)
        self._t += h
        return h

    def _self_discharge(self, energy: float, h: float) -> float:
        kept = math.exp(-self._self_rate * h)
        self._self_loss += energy * (1.0 - kept)
        return energy * kept

    def _thermal(self, loss_w: float, h: float) -> None:
        p = self.params
        # Exact solution of the first-order model for constant losses over the step.
        target = p.ambient_c + loss_w * p.thermal_resistance_k_per_w
        if self._forced_fault:
            target = max(target, p.trip_c + 2.0)
        self._temp = target + (self._temp - target) * math.exp(-h / self._tau)
        if self._temp >= p.trip_c:
            self._tripped = True
        elif self._tripped and not self._forced_fault and self._temp < p.derate_start_c:
            self._tripped = False
