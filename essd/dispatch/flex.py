"""Flexible loads in the dispatch LP: EV sessions and swap-station packs as battery-like columns
with a deadline, joined to the site balance of :class:`essd.dispatch.model.DispatchModel`.

Per column s (one session, see :mod:`essd.dispatch.sessions`) and step t, ``h`` hours a step:

- charge ``ch[s,t]`` in [0, ub_ch] and V2G ``dis[s,t]`` in [0, ub_dis] (AC kW; the bounds are
  the limits times the share of the step the vehicle is present);
- AC energy delivered since the horizon start ``en[s,t] = en[s,t-1] + h*(ch - dis/rt)`` inside
  [lo, hi], where ``rt`` is a fixed round-trip efficiency for V2G (energy taken out of the
  vehicle costs more than it gives the site);
- the requirement ``en[s,T-1] + short[s] >= need[s]``: a column has no power after its
  departure, so its energy at the end of the horizon is its energy at the departure. Soft,
  each kWh short priced at ``shortfall_cost_per_kwh`` x the session's priority (well above
  any energy price, well
  below the site-limit violation cost, so a site limit wins over a deadline and the
  shortfall is published as slack);
- the site sees ``sum_s (ch - dis)`` in its balance, so the sessions share the import limit and
  the demand charge with the batteries, and charge when energy is cheap, low-carbon (the
  carbon price is in the import price) or PV surplus that would be exported for less.

Objective terms added: shortfall cost, a V2G wear cost per kWh discharged, and a tiny
preference for charging earlier among equally priced steps (a vehicle may leave early).

Every per-cycle number is a ``cp.Parameter`` appearing only in bounds and right-hand sides, so
the problem stays DPP (compiled once) and its constraint matrix fixed (the HiGHS hot start
keeps working).
"""

from __future__ import annotations

from typing import Any

import cvxpy
import numpy as np
import numpy.typing as npt

from essd.dispatch.sessions import FlexArrays

__all__ = ["FlexModel"]


cp: Any = cvxpy


FloatArray = npt.NDArray[np.float64]


# Preference (currency per kWh over the whole horizon) for charging early among equally priced
# steps: far below any real price difference, enough to break ties.
_EARLY_PER_KWH = 1e-4


class FlexModel:
    """The flexible-load columns of one dispatch LP; parameters set per solve."""

    def __init__(
        self,
        columns: int,
        steps: int,
        h: float,
        *,
        shortfall_cost_per_kwh: float,
        v2g: bool = True,
        v2g_round_trip: float = 0.85,
        v2g_cost_per_kwh: float = 0.05,
    ) -> None:
        ns, nt = columns, steps
        self.columns = columns
        self.v2g = v2g
        early = _EARLY_PER_KWH * h * np.arange(nt) / max(nt, 1)
        if not v2g:
            self._charge_only(ns, nt, h, shortfall_cost_per_kwh, early)
            return
        p = self.params = {
            "ub_ch": cp.Parameter((ns, nt), name="flex_ub_ch"),
            "ub_dis": cp.Parameter((ns, nt), name="flex_ub_dis"),
            "lo": cp.Parameter((ns, nt), name="flex_lo"),
            "hi": cp.Parameter((ns, nt), name="flex_hi"),
            "need": cp.Parameter(ns, name="flex_need"),
            "priority": cp.Parameter(ns, name="flex_priority"),
        }
        for param in p.values():
            param.value = np.zeros(param.shape)
        ch = self.ch = cp.Variable((ns, nt), name="flex_charge_kw", bounds=[0, p["ub_ch"]])
        dis = self.dis = cp.Variable((ns, nt), name="flex_v2g_kw", bounds=[0, p["ub_dis"]])
        en = self.en = cp.Variable((ns, nt), name="flex_delivered_kwh", bounds=[p["lo"], p["hi"]])
        short = self.short = cp.Variable(ns, name="flex_short_kwh", nonneg=True)
        flow = h * (ch - dis / v2g_round_trip)
        # A copy of the final energy: ``en`` has parameter bounds (see DispatchModel's e_end).
        en_end = cp.Variable(ns, name="flex_final_kwh")
        self.constraints = [
            en[:, 0] == flow[:, 0],
            en[:, 1:] == en[:, :-1] + flow[:, 1:],
            en_end == en[:, nt - 1],
            en_end + short >= p["need"],
        ]
        self.cost = (
            shortfall_cost_per_kwh * (p["priority"] @ short)
            + v2g_cost_per_kwh * h * cp.sum(dis)
            + cp.sum(ch @ early)
        )
        # Power the columns draw from the site, kW per step (> 0 imports, like load).
        self.site_kw = cp.sum(ch - dis, axis=0)

    def _charge_only(
        self, ns: int, nt: int, h: float, shortfall_cost: float, early: FloatArray
    ) -> None:
        """Without V2G a column's energy only grows: the requirement and the room bind only
        its total, so the per-step energy variables are not needed (a third of the size)."""
        p = self.params = {
            "ub_ch": cp.Parameter((ns, nt), name="flex_ub_ch"),
            "room": cp.Parameter(ns, name="flex_room"),
            "need": cp.Parameter(ns, name="flex_need"),
            "priority": cp.Parameter(ns, name="flex_priority"),
        }
        for param in p.values():
            param.value = np.zeros(param.shape)
        ch = self.ch = cp.Variable((ns, nt), name="flex_charge_kw", bounds=[0, p["ub_ch"]])
        short = self.short = cp.Variable(ns, name="flex_short_kwh", nonneg=True)
        delivered = h * cp.sum(ch, axis=1)
        self.constraints = [delivered + short >= p["need"], delivered <= p["room"]]
        self.cost = shortfall_cost * (p["priority"] @ short) + cp.sum(ch @ early)
        self.site_kw = cp.sum(ch, axis=0)

    def assign(self, f: FlexArrays) -> None:
        """Set every parameter from validated sessions."""
        p = self.params
        p["ub_ch"].value = f.ub_ch
        p["need"].value = f.need
        p["priority"].value = f.priority
        if not self.v2g:
            p["room"].value = f.hi[:, 0]
            return
        p["ub_dis"].value = f.ub_dis
        p["lo"].value = f.lo
        p["hi"].value = f.hi

    def power_kw(self) -> FloatArray:
        """Solved per-column power (S, T), battery sign (< 0 charges the vehicle)."""
        charge = np.asarray(self.ch.value)
        if not self.v2g:
            return -charge
        power: FloatArray = np.asarray(self.dis.value) - charge
        return power

    def shortfall_kwh(self) -> FloatArray:
        """Solved per-column shortfall of AC energy at the deadline (S,)."""
        short: FloatArray = np.maximum(np.asarray(self.short.value), 0.0)
        return short
