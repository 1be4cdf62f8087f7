"""Flexible loads with a deadline: EV charging sessions and swap-station packs, and their
validation into per-column arrays for the LP (:mod:`essd.dispatch.flex`).

Sign conventions: a session's power in a :class:`essd.domain.Plan` follows the battery sign
(W > 0 discharges into the site, i.e. V2G; < 0 charges the vehicle); the limits here are
magnitudes in W, energies in Wh, times epoch seconds.

Each session occupies one LP *column* for the horizon: a charger with a vehicle plugged in and
the next one expected uses two columns (their windows never overlap). The LP column works in
AC energy: what the charger delivers, so that the balance with the site meter is exact; the
requirement in battery energy is divided by the charge efficiency on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from essd.dispatch.inputs import DispatchInputs, InvalidDispatchInputsError, check_finite


def presence_now(s: FlexSession, time: float, step_s: float) -> float:
    """Share of the first step ``[time, time + step_s)`` the session is present (as planned:
    a departure already past counts as :data:`MIN_STAY_S` from ``time``)."""
    departure = max(s.departure_s, time + MIN_STAY_S)
    stay = min(time + step_s, departure) - max(time, s.arrival_s)
    return min(max(stay / step_s, 0.0), 1.0)


FloatArray = npt.NDArray[np.float64]


# A vehicle still plugged in after its departure may leave any moment: planned as staying this
# long (s), so what it still needs is charged at full power now and the rest published short.
MIN_STAY_S = 60.0


# Energy a column may hold above what a session needs when its room is not known (kWh):
# a bound, not a guess at the battery (the requirement is what stops the charging).
_UNKNOWN_ROOM_KWH = 1.0e3


@dataclass(frozen=True, slots=True)
class FlexSession:
    """One vehicle on a charger (or one pack in a swap slot): a load with a deadline.

    - ``id``: unique per session; ``charger_id``: where it is (or will be) plugged in.
    - ``arrival_s`` / ``departure_s``: epoch seconds; an arrival at or before the horizon start
      means plugged in now. The departure is the user's, a schedule's or a learned one.
    - ``energy_needed_wh``: battery energy still to add by the departure (>= 0).
    - ``max_power_w``: most AC charge power (> 0); ``min_power_w``: least power the charger can
      run at while charging (0 for none; a plan below it rounds to 0 or up to it when applied).
    - ``max_discharge_w``: V2G power allowed (0: no V2G); ``v2g_energy_wh``: most battery
      energy V2G may take below the level at arrival.
    - ``energy_room_wh``: battery energy that still fits (``math.inf`` when not known).
    - ``charge_efficiency``: AC to battery, in (0, 1].
    - ``priority``: multiplies the cost of each kWh short (> 0). Where not every requirement
      can be met, the LP meets those of higher priority first: a swap station ranks its packs
      so that it completes some packs rather than half-charging all of them.
    """

    id: str
    charger_id: str
    arrival_s: float
    departure_s: float
    energy_needed_wh: float
    max_power_w: float
    min_power_w: float = 0.0
    max_discharge_w: float = 0.0
    v2g_energy_wh: float = 0.0
    energy_room_wh: float = math.inf
    charge_efficiency: float = 0.92
    priority: float = 1.0


@dataclass(frozen=True, slots=True)
class FlexArrays:
    """Validated sessions as per-column arrays (kW, AC kWh), session order of the input.

    ``ub_ch`` / ``ub_dis`` (S, T): charge / V2G bounds, the limit times the share of each step
    the vehicle is present; ``lo`` / ``hi`` (S, T): bounds of the AC energy delivered since the
    horizon start; ``need`` (S,): the delivered energy required by the departure (or by the
    end of the horizon, of a departure after it). Unused columns are all zero.
    """

    ids: tuple[str, ...]
    ub_ch: FloatArray
    ub_dis: FloatArray
    lo: FloatArray
    hi: FloatArray
    need: FloatArray  # (S,) AC kWh due
    need_wh: FloatArray  # (S,) battery energy needed by the departure (0 for unused columns)
    efficiency: FloatArray  # (S,) charge efficiency (1 for unused columns)
    priority: FloatArray  # (S,) shortfall cost multiplier (1 for unused columns)


def _check_session(k: int, s: FlexSession) -> None:
    if not isinstance(s, FlexSession):
        raise InvalidDispatchInputsError(f"sessions[{k}]", "must be an essd FlexSession")
    name = f"sessions[{s.id or k}]"
    if not s.id:
        raise InvalidDispatchInputsError(f"sessions[{k}].id", "must be a non-empty string")
    for field_name in ("arrival_s", "departure_s"):
        check_finite(f"{name}.{field_name}", getattr(s, field_name))
    for field_name in ("energy_needed_wh", "min_power_w", "max_discharge_w", "v2g_energy_wh"):
        check_finite(f"{name}.{field_name}", getattr(s, field_name), lo=0.0)
    check_finite(f"{name}.energy_room_wh", s.energy_room_wh, lo=0.0, allow_inf=True)
    check_finite(f"{name}.max_power_w", s.max_power_w, lo=0.0)
    if s.max_power_w <= 0:
        raise InvalidDispatchInputsError(f"{name}.max_power_w", "must be > 0")
    if s.min_power_w > s.max_power_w:
        raise InvalidDispatchInputsError(f"{name}.min_power_w", "must not exceed max_power_w")
    if s.departure_s <= s.arrival_s:
        raise InvalidDispatchInputsError(f"{name}.departure_s", "must be after arrival_s")
    if not (math.isfinite(s.charge_efficiency) and 0 < s.charge_efficiency <= 1):
        raise InvalidDispatchInputsError(f"{name}.charge_efficiency", "must be in (0, 1]")
    if not (math.isfinite(s.priority) and 0 < s.priority <= 1000):
        raise InvalidDispatchInputsError(f"{name}.priority", "must be in (0, 1000]")


def validate_sessions(
    sessions: Sequence[FlexSession], columns: int, *, time: float, step_s: float, steps: int
) -> FlexArrays:
    """Check ``sessions`` and lay them out in ``columns`` LP columns for a horizon from ``time``.

    Raises InvalidDispatchInputsError naming the offending field. A step the vehicle is present
    for only in part bounds its power by that share (the LP works in step averages: see
    :func:`presence_now` for turning the first step back into a charger limit). A vehicle still
    plugged in after its departure is planned as leaving within :data:`MIN_STAY_S`; a departure
    beyond the horizon asks of the horizon only what cannot be delivered after it at full
    power.
    """
    if len(sessions) > columns:
        raise InvalidDispatchInputsError(
            "sessions", f"{len(sessions)} sessions but the optimizer has {columns} columns"
        )
    seen: set[str] = set()
    for k, s in enumerate(sessions):
        _check_session(k, s)
        if s.id in seen:
            raise InvalidDispatchInputsError(f"sessions[{s.id}]", "duplicate session id")
        seen.add(s.id)
    h = step_s / 3600.0
    n = len(sessions)
    end = time + step_s * steps
    # One row per session, vectorized: presence share of every step, limits, energies.
    arrival = np.array([s.arrival_s for s in sessions], dtype=np.float64)
    departure = np.maximum([s.departure_s for s in sessions], time + MIN_STAY_S)
    p_max = np.array([s.max_power_w for s in sessions], dtype=np.float64) / 1000.0
    p_dis = np.array([s.max_discharge_w for s in sessions], dtype=np.float64) / 1000.0
    eta = np.array([s.charge_efficiency for s in sessions], dtype=np.float64)
    starts = time + step_s * np.arange(steps)
    overlap = np.minimum(starts + step_s, departure[:, None]) - np.maximum(starts, arrival[:, None])
    share = np.clip(overlap / step_s, 0.0, 1.0)
    shape = (columns, steps)
    ub_ch, ub_dis = np.zeros(shape), np.zeros(shape)
    lo, hi, need = np.zeros(shape), np.zeros(shape), np.zeros(columns)
    need_wh, eff, prio = np.zeros(columns), np.ones(columns), np.ones(columns)
    ub_ch[:n] = share * p_max[:, None]
    ub_dis[:n] = share * p_dis[:, None]
    eff[:n] = eta
    # V2G may go below the arrival level by v2g_energy_wh (battery) = that x eta x eta_d of
    # AC; taking the AC figure as battery / eta keeps the bound conservative enough.
    lo[:n] = np.where(p_dis > 0, [-s.v2g_energy_wh / 1000.0 for s in sessions], 0.0)[:, None]
    room = np.array([s.energy_room_wh for s in sessions], dtype=np.float64) / 1000.0 / eta
    need_wh[:n] = [s.energy_needed_wh for s in sessions]
    prio[:n] = [s.priority for s in sessions]
    # What can still be delivered after the horizon, at full power, before the departure.
    after = np.maximum(departure - np.maximum(end, arrival), 0.0) / 3600.0 * p_max
    due = np.maximum(need_wh[:n] / 1000.0 / eta - after, 0.0)
    top = np.minimum(room, ub_ch[:n].sum(axis=1) * h + _UNKNOWN_ROOM_KWH)
    hi[:n] = top[:, None]
    need[:n] = np.minimum(due, top)
    ids = tuple(s.id for s in sessions)
    return FlexArrays(ids, ub_ch, ub_dis, lo, hi, need, need_wh, eff, prio)


def session_arrays(inputs: DispatchInputs, columns: int, steps: int, *, v2g: bool) -> FlexArrays:
    """The sessions of ``inputs`` for an optimizer with ``columns`` columns (V2G or not)."""
    if not v2g:
        for s in inputs.sessions:
            if getattr(s, "max_discharge_w", 0.0) > 0:
                raise InvalidDispatchInputsError(
                    f"sessions[{s.id}].max_discharge_w", "this optimizer plans no V2G"
                )
    return validate_sessions(
        inputs.sessions, columns, time=inputs.time, step_s=inputs.step_s, steps=steps
    )
