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

from essd.dispatch.sessions import FlexSession

__all__ = ["PackState", "SwapDemandLearner", "SwapStationSpec", "swap_sessions"]


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
    a pack usually arrives with, and the margin added to the swap forecast (a ratio: 0.2
    plans for 20 % more swaps than expected)."""

    service_level: int
    target_soc: float = 0.95
    arrival_soc: float = 0.2
    demand_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.service_level < 0:
            raise ValueError(f"service_level: must be >= 0, got {self.service_level!r}")
        for name in ("target_soc", "arrival_soc"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: must be a ratio in [0, 1], got {v!r}")
        if not (math.isfinite(self.demand_margin) and self.demand_margin >= 0):
            raise ValueError(f"demand_margin: must be >= 0, got {self.demand_margin!r}")


def _swap_steps(demand: Sequence[float], margin: float, count: int) -> list[int | None]:
    """Step in which the m-th swap (m = 1..count) is expected; None beyond the horizon."""
    cumulative = np.cumsum(np.maximum(np.asarray(demand, dtype=np.float64), 0.0)) * (1 + margin)
    out: list[int | None] = []
    for m in range(1, count + 1):
        idx = int(np.searchsorted(cumulative, m - 1e-9))
        out.append(idx if idx < len(cumulative) else None)
    return out


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
    swap_at = _swap_steps(demand_per_step, spec.demand_margin, n + columns)

    def deadline(m: int) -> float:
        """End of the step of swap ``m`` (m <= 0: now); past the horizon: its end + a step."""
        if m <= 0:
            return now + 1.0
        step = swap_at[m - 1] if m - 1 < len(swap_at) else None
        return end + step_s if step is None else now + step_s * step

    out: list[FlexSession] = []
    for j, p in enumerate(order):
        need = max(spec.target_soc - p.soc, 0.0) * p.capacity_wh
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
            need = max(spec.target_soc - spec.arrival_soc, 0.0) * leaving.capacity_wh
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
                )
            )
        m += 1
    return out


@dataclass(slots=True)
class SwapDemandLearner:
    """Swaps per hour of the week (UTC), learned from past swaps by EWMA of hourly counts.

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
            slot = self._counting % 168
            old = self.rate.get(slot, self.prior_per_hour)
            self.rate[slot] = old + self.weight * (self._count - old)
            self._counting += 1
            self._count = 0

    def forecast(self, start: float, step_s: float, steps: int) -> list[float]:
        """Expected swaps in each step of ``steps`` from ``start``."""
        out = []
        for i in range(steps):
            t = start + step_s * (i + 0.5)
            out.append(self.rate.get(int(t // 3600) % 168, self.prior_per_hour) * step_s / 3600.0)
        return out
