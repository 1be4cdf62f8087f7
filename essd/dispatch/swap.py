"""A battery-swap station as flexible loads: packs in charging slots, a swap-demand forecast
and a service level, turned into sessions with deadlines for the dispatch LP.

The service level: at every step at least ``k`` charged packs (SoC >= ``target_soc``) are in
the slots. A swap takes the best charged pack out and docks a depleted one in its slot.

Reduction to deadlines. Let ``D(t)`` be the number of swaps expected by the end of step t
(the forecast's cumulative sum, with a safety margin) and ``s_m`` the step in which ``D``
first reaches ``m``. Order the packs now in the slots by SoC, best first, and let the packs
that swaps will dock follow in the order they dock. The pack at place ``j`` in that queue is
the one that the swap number ``j + 1`` takes out, so it must be charged when swap
``j - k + 1`` has happened and only ``k`` charged packs remain ahead of it: its deadline is
``s_(j-k+1)`` (now for ``j < k``: a pack among the first ``k`` that is not charged yet is a
service-level shortfall now, published as slack). A docked pack (swap ``m`` docks the pack at
place ``N + m - 1``) is present from ``s_m`` on and needs the energy from the depleted SoC a
pack usually arrives with. The LP then charges each pack in its window at the lowest cost.

Units: power W, energy Wh, SoC ratio 0..1, times epoch s, swaps per step (expected count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from essd.dispatch.sessions import FlexSession


@dataclass(frozen=True, slots=True)
class PackState:
    """One pack in a charging slot now."""

    slot: str
    soc: float
    capacity_wh: float
    max_charge_w: float
    charge_efficiency: float = 0.95


@dataclass(frozen=True, slots=True)
class SwapStationSpec:
    """The station's fixed description: service level, the SoC of a charged pack, the SoC
    a pack usually arrives with, and how far above the expected swaps the plan goes: the
    count by a time with ``Lambda`` swaps expected is planned as
    ``Lambda * (1 + demand_margin) + demand_z * sqrt(Lambda)`` (a normal bound on the Poisson
    count: z = 2.33 for 99 %), so a burst of arrivals still finds charged packs.
    ``charge_margin_soc``: packs are charged this far past ``target_soc`` so a measurement
    or rounding a hair below does not count a charged pack as not charged."""

    service_level: int
    target_soc: float = 0.95
    arrival_soc: float = 0.2
    demand_margin: float = 0.0
    demand_z: float = 2.33
    charge_margin_soc: float = 0.005

    def __post_init__(self) -> None:
        if self.service_level < 0:
            raise ValueError(f"service_level: must be >= 0, got {self.service_level!r}")
        for name in ("target_soc", "arrival_soc"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: must be a ratio in [0, 1], got {v!r}")
        for name in ("demand_margin", "demand_z", "charge_margin_soc"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: must be >= 0, got {v!r}")


def _swap_steps(demand: Sequence[float], spec: SwapStationSpec, count: int) -> list[int | None]:
    """Step in which the m-th swap (m = 1..count) is planned for; None beyond the horizon.

    The count by the *start* of each step is bounded (see SwapStationSpec), so the m-th swap
    is planned for the first step that could see it.
    """
    cumulative = _bound(demand, spec)
    out: list[int | None] = []
    for m in range(1, count + 1):
        idx = int(np.searchsorted(cumulative, m - 1e-9))
        out.append(idx if idx < len(cumulative) else None)
    return out


def _bound(demand: Sequence[float], spec: SwapStationSpec) -> npt.NDArray[np.float64]:
    """The planned swap count by the end of each step (see SwapStationSpec)."""
    expected = np.cumsum(np.maximum(np.asarray(demand, dtype=np.float64), 0.0))
    bound: npt.NDArray[np.float64] = expected * (1 + spec.demand_margin) + spec.demand_z * np.sqrt(
        expected
    )
    return bound


def swap_sessions(
    spec: SwapStationSpec,
    packs: Sequence[PackState],
    demand_per_step: Sequence[float],
    *,
    now: float,
    step_s: float,
    columns: int,
) -> list[FlexSession]:
    """The sessions (at most ``columns``) that keep the service level over the horizon.

    ``demand_per_step``: expected swaps in each step of the horizon from ``now``. Packs whose
    deadline lies beyond the horizon still get a session (charged at leisure, by the end);
    docked packs are added while columns remain, earliest first.
    """
    steps = len(demand_per_step)
    end = now + step_s * steps
    order = sorted(packs, key=lambda p: -p.soc)
    n, k = len(order), spec.service_level
    swap_at = _swap_steps(demand_per_step, spec, n + columns)
    bound = _bound(demand_per_step, spec)
    per_step = float(bound[-1]) / steps if steps and bound[-1] > 0 else 0.0
    full = min(spec.target_soc + spec.charge_margin_soc, 1.0)

    def deadline(m: int) -> float:
        """Start of the step of swap ``m`` (m <= 0: now); past the horizon, extrapolated at
        the horizon's mean planned rate (a day on when no swap is expected at all)."""
        if m <= 0:
            return now + 1.0
        step = swap_at[m - 1] if m - 1 < len(swap_at) else None
        if step is None:
            if per_step <= 0:
                return end + 86_400.0
            return end + (m - float(bound[-1])) / per_step * step_s
        # A swap expected in the first step: the pack is due within it.
        return max(now + step_s * step, now + 1.0)

    out: list[FlexSession] = []
    for j, p in enumerate(order):
        need = max(full - p.soc, 0.0) * p.capacity_wh if p.soc < spec.target_soc else 0.0
        out.append(
            FlexSession(
                id=f"pack:{p.slot}",
                charger_id=p.slot,
                arrival_s=now,
                departure_s=deadline(j - k + 1),
                energy_needed_wh=need,
                max_power_w=p.max_charge_w,
                charge_efficiency=p.charge_efficiency,
                energy_room_wh=max(1.0 - p.soc, 0.0) * p.capacity_wh,
                # Earlier in the queue, higher priority: complete packs in order.
                priority=2.0 - j / (n + columns),
            )
        )
    # Docked packs: swap m takes the pack at place m-1 out and docks one into its slot.
    m = 1
    while len(out) < columns and m - 1 < len(swap_at) and swap_at[m - 1] is not None and n:
        step = swap_at[m - 1]
        assert step is not None
        leaving = order[(m - 1) % n]  # the slot the swap frees (a later one reuses slots)
        arrive = now + step_s * step
        due = deadline(n + m - k)
        if due > arrive:
            need = max(full - spec.arrival_soc, 0.0) * leaving.capacity_wh
            out.append(
                FlexSession(
                    id=f"dock:{m}",
                    charger_id=leaving.slot,
                    arrival_s=arrive,
                    departure_s=due,
                    energy_needed_wh=need,
                    max_power_w=leaving.max_charge_w,
                    charge_efficiency=leaving.charge_efficiency,
                    energy_room_wh=(1.0 - spec.arrival_soc) * leaving.capacity_wh,
                    priority=2.0 - (n + m - 1) / (n + columns),
                )
            )
        m += 1
    return out


@dataclass(slots=True)
class SwapDemandLearner:
    """Swaps per hour of the day (UTC), learned from past swaps by EWMA of hourly counts (a
    taxi fleet's demand follows the day; a week would teach each hour of the week only once).

    ``observe`` each swap as it happens; ``close_hour`` at the end of every hour (a quiet
    hour teaches as much as a busy one); ``forecast`` the expected swaps per step.
    """

    weight: float = 0.2
    prior_per_hour: float = 1.0
    rate: dict[int, float] = field(default_factory=dict)
    _counting: int | None = None
    _count: int = 0

    def observe(self, t: float) -> None:
        """One swap at ``t``."""
        self._roll(t)
        self._count += 1

    def close_hour(self, t: float) -> None:
        """Book the hours that ended before ``t``."""
        self._roll(t)

    def _roll(self, t: float) -> None:
        hour = int(t // 3600)
        if self._counting is None:
            self._counting = hour
        while self._counting < hour:
            slot = self._counting % 24
            old = self.rate.get(slot, self.prior_per_hour)
            self.rate[slot] = old + self.weight * (self._count - old)
            self._counting += 1
            self._count = 0

    def forecast(self, start: float, step_s: float, steps: int) -> list[float]:
        """Expected swaps in each step of ``steps`` from ``start``."""
        out = []
        for i in range(steps):
            t = start + step_s * (i + 0.5)
            out.append(self.rate.get(int(t // 3600) % 24, self.prior_per_hour) * step_s / 3600.0)
        return out
