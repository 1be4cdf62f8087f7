"""Units planned as groups: a large site's LP shrinks to one battery per kind of unit.

Units with the same specification (capacity, efficiencies, wear cost, discharge capability)
form a group; the LP sees one battery per group whose energies, limits, SoC window, previous
setpoint and terminal target are the members' sums. The group's planned power is then shared
among its members:

- step by step in proportion to each member's headroom (energy above its window's lower
  edge when discharging, room below its upper edge when charging, as the earlier steps'
  shares leave it; a member without a limit in that direction takes none): members then
  reach their window's edges together, as the group does, instead of one emptying first;
- a member's share is held to its own limit and the rest goes to the members with limit left.

Exact when the members' live data are equal (the LP then has a symmetric optimum, which
equal shares reproduce), and also when their SoCs differ but no member's power limit binds
before the group's: shares by headroom shrink every member's headroom by the same factor.
Where a member's limit does bind it can reach its window's edge before the group does; the
plan is then clipped there by the same step-by-step simulation every plan goes through, so the
published SoC stays honest, and a little plan value is lost (tests: under 1 %).
``benchmarks/bench_optimizer.py`` measures it against the full LP
(``optimizer.aggregate_loss_ratio``).

:meth:`Aggregation.clustered` groups *similar* units the same way for large sites of
different units (the group's battery has their capacity-weighted efficiencies and wear cost):
an approximation whose loss grows with how different a group's units are
(``optimizer.cluster10_loss_ratio``).

Sign conventions: battery power > 0 discharges into the site, < 0 charges. kW / kWh inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from essd.dispatch.inputs import BatterySpec, DispatchArrays

FloatArray = npt.NDArray[np.float64]


def _kind(b: BatterySpec) -> tuple[float, float, float, float, bool]:
    return (
        b.capacity_wh,
        b.charge_efficiency,
        b.discharge_efficiency,
        b.degradation_cost_per_kwh,
        b.can_discharge,
    )


# ``control.aggregate_clusters = "auto"``: an LP of more battery-steps than this (after
# identical units are grouped) is planned as groups of similar units, as many as fit. Measured
# on this machine (bench `optimizer.*.100x288`): 10 x 288 battery-steps solve cold in about
# 0.3-0.5 s and re-solve across a horizon step in about 0.1 s; 20 x 288 takes 1.4 s cold and
# 40 x 288 4 s, past a 2-s solve budget.
AUTO_BATTERY_STEPS = 3000


def auto_groups(batteries: int, steps: int, budget: int = AUTO_BATTERY_STEPS) -> int | None:
    """The group count ``"auto"`` plans ``batteries`` x ``steps`` with (None: no grouping)."""
    if batteries * steps <= budget:
        return None
    return max(1, budget // steps)


# A typical energy price (per kWh) to weigh round-trip losses against wear when ordering
# units by what a kWh cycled through them costs.
_TYPICAL_PRICE_PER_KWH = 0.25


def _cycle_cost(b: BatterySpec) -> float:
    """What a kWh stored and returned costs in this unit: wear both ways and the energy lost."""
    round_trip = b.charge_efficiency * b.discharge_efficiency
    return 2.0 * b.degradation_cost_per_kwh + _TYPICAL_PRICE_PER_KWH * (1.0 - round_trip)


@dataclass(frozen=True)
class Aggregation:
    """The groups of identical units of one topology and the battery that stands for each."""

    specs: tuple[BatterySpec, ...]  # one per group, in order of the group's first member
    member_of: FloatArray  # (groups, units) 0/1: unit j belongs to group g
    group_of: npt.NDArray[np.intp]  # (units,) the group of each unit
    eta_c: FloatArray  # (units,) charge efficiency
    eta_d: FloatArray  # (units,) discharge efficiency

    @classmethod
    def of(cls, batteries: Sequence[BatterySpec]) -> Aggregation:
        """Group ``batteries`` by specification (order of first appearance kept)."""
        groups: dict[tuple[float, float, float, float, bool], list[int]] = {}
        for k, b in enumerate(batteries):
            groups.setdefault(_kind(b), []).append(k)
        return cls._build(batteries, list(groups.values()))

    @classmethod
    def clustered(cls, batteries: Sequence[BatterySpec], groups: int) -> Aggregation:
        """At most about ``groups`` groups of *similar* units: an approximation.

        Units that can discharge and units that cannot are never mixed. Within each, units
        are ordered by what a kWh cycled through them costs (wear both ways and the round
        trip's loss at a typical price) and cut into runs of equal count; the group's battery
        has the members' total capacity and their capacity-weighted efficiencies and wear
        cost. Each unit's share is still simulated with its own efficiencies, limits and
        window. Ordering by efficiency first was measured: 20 units in 10 groups lost 2.8 %
        of plan value that way, 0.2 % ordered by cycle cost.
        """
        able = [k for k, b in enumerate(batteries) if b.can_discharge]
        unable = [k for k, b in enumerate(batteries) if not b.can_discharge]
        classes = [c for c in (able, unable) if c]
        runs: list[list[int]] = []
        for members in classes:
            count = max(1, round(groups * len(members) / len(batteries)))
            ordered = sorted(members, key=lambda k: _cycle_cost(batteries[k]))
            runs += [list(chunk) for chunk in np.array_split(ordered, count) if len(chunk)]
        return cls._build(batteries, runs)

    @classmethod
    def _build(cls, batteries: Sequence[BatterySpec], groups: list[list[int]]) -> Aggregation:
        specs = []
        member_of = np.zeros((len(groups), len(batteries)))
        for g, members in enumerate(groups):
            first = batteries[members[0]]
            cap = np.array([batteries[k].capacity_wh for k in members])
            weight = cap / cap.sum()

            def mean(attr: str, members: list[int] = members, weight: FloatArray = weight) -> float:
                return float(weight @ np.array([getattr(batteries[k], attr) for k in members]))

            name = first.id if len(members) == 1 else f"{first.id}+{len(members) - 1}"
            specs.append(
                replace(
                    first,
                    id=name,
                    capacity_wh=float(cap.sum()),
                    charge_efficiency=mean("charge_efficiency"),
                    discharge_efficiency=mean("discharge_efficiency"),
                    degradation_cost_per_kwh=mean("degradation_cost_per_kwh"),
                )
            )
            member_of[g, members] = 1.0
        eta_c = np.array([b.charge_efficiency for b in batteries])
        eta_d = np.array([b.discharge_efficiency for b in batteries])
        return cls(tuple(specs), member_of, np.argmax(member_of, axis=0), eta_c, eta_d)

    @property
    def reduces(self) -> bool:
        """True when at least two units share a group (the LP gets smaller)."""
        rows, cols = self.member_of.shape
        return bool(rows < cols)

    def arrays(self, a: DispatchArrays) -> DispatchArrays:
        """The per-unit arrays summed per group (site-wide ones unchanged)."""
        s = self.member_of
        return replace(
            a,
            e0=s @ a.e0,
            ub_c=s @ a.ub_c,
            ub_d=s @ a.ub_d,
            lo=s @ a.lo,
            hi=s @ a.hi,
            prev_kw=s @ a.prev_kw,
            target_e=s @ a.target_e,
        )

    def split(
        self, power_kw: FloatArray, a: DispatchArrays, e_lo: FloatArray, e_hi: FloatArray
    ) -> FloatArray:
        """Each member's power (units, T) from its group's (groups, T).

        ``a`` and the energy window ``e_lo`` / ``e_hi`` (units, T, kWh) are the members'. Step
        by step, each member's headroom is taken from the energy its earlier shares leave.
        """
        gain_c, loss_d = a.h * self.eta_c, a.h / self.eta_d
        # Step-major copies: each step reads contiguous rows.
        up, down = np.maximum(power_kw, 0.0).T.copy(), np.maximum(-power_kw, 0.0).T.copy()
        ub_d, ub_c, lo, hi = (x.T.copy() for x in (a.ub_d, a.ub_c, e_lo, e_hi))
        out = np.empty_like(ub_c)
        cur = a.e0.copy()
        for t in range(out.shape[0]):
            discharge = self._share(up[t], ub_d[t], cur - lo[t])
            p = discharge - self._share(down[t], ub_c[t], hi[t] - cur)
            out[t] = p
            cur -= np.where(p < 0.0, p * gain_c, p * loss_d)
        result: FloatArray = out.T.copy()
        return result

    def _share(self, group_kw: FloatArray, limit: FloatArray, headroom: FloatArray) -> FloatArray:
        """``group_kw`` (groups, >= 0) shared by headroom, each held to its limit.

        Called twice per step: the common cases (nothing to share, no limit reached) take as
        few numpy calls as possible.
        """
        g = self.group_of
        n = len(self.specs)
        if not group_kw.any():
            return np.zeros_like(limit)

        def total(x: FloatArray) -> FloatArray:
            """Each member's group total of ``x``."""
            summed: FloatArray = np.bincount(g, weights=x, minlength=n).astype(np.float64)[g]
            return summed

        # Only where a unit may move at all (a unit that is away has no limit).
        weight = np.maximum(headroom, 0.0)
        weight[limit <= 0.0] = 0.0
        weight_sum = total(weight)
        empty = weight_sum <= 0.0
        if empty.any():
            # Members without headroom still take their part by limit when all of them lack it.
            weight = np.where(empty, limit, weight)
            weight_sum = np.where(empty, total(limit), weight_sum)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = weight * group_kw[g] / weight_sum
        share[weight_sum <= 0.0] = 0.0
        first = np.minimum(share, limit)
        cut = share - first
        if not cut.any():
            return first
        # What the limits cut off goes to the members with limit left, in proportion to it.
        left = limit - first
        room = total(left)
        with np.errstate(divide="ignore", invalid="ignore"):
            extra = left * total(cut) / room
        extra[room <= 0.0] = 0.0
        result: FloatArray = first + np.minimum(extra, left)
        return result
