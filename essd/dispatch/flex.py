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

from dataclasses import replace
from typing import Any

import cvxpy
import numpy as np
import numpy.typing as npt

from essd.dispatch.inputs import (
    DispatchArrays,
    DispatchInputs,
    InvalidDispatchInputsError,
    check_finite,
)
from essd.dispatch.lpmaps import set_parameter
from essd.dispatch.sessions import FlexArrays, session_arrays
from essd.domain import Plan

cp: Any = cvxpy


FloatArray = npt.NDArray[np.float64]


# Preference (currency per kWh over the whole horizon) for charging early among equally priced
# steps: far below any real price difference, enough to break ties.
_EARLY_PER_KWH = 1e-4


# A shortfall below this (AC kW x h) is solver residue, not a published slack.
_TOL_KW = 1e-5


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
        # The FlexSpec whose current sessions refresh() assigns (set by FlexSpec.model).
        self.source: FlexSpec | None = None
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
        # validate_sessions checked every value: no cvxpy value check per assignment.
        values = {"ub_ch": f.ub_ch, "need": f.need, "priority": f.priority}
        if self.v2g:
            values |= {"ub_dis": f.ub_dis, "lo": f.lo, "hi": f.hi}
        else:
            values["room"] = f.hi[:, 0]
        for name, value in values.items():
            set_parameter(self.params[name], value)

    def refresh(self) -> None:
        """Set the parameters from the source's current sessions (with the LP's others)."""
        if self.source is not None and self.source.current is not None:
            self.assign(self.source.current)

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


class FlexSpec:
    """A Dispatcher's flexible-load columns: how many, whether V2G, what a kWh short costs;
    and, during a solve, the sessions being planned: one per Dispatcher, one solve at a time.

    ``prepare`` validates the cycle's sessions and sets the model's parameters, ``collect``
    reads the solution (shortfalls into the slack, before the rung is chosen) and ``attach``
    puts each session's power into the plan.
    """

    def __init__(
        self, columns: int, shortfall_cost_per_kwh: float = 5.0, *, v2g: bool = False
    ) -> None:
        if columns < 0:
            raise InvalidDispatchInputsError("flex_columns", f"must be >= 0, got {columns!r}")
        check_finite("session_shortfall_cost_per_kwh", shortfall_cost_per_kwh, lo=0.0)
        self.columns = columns
        self.v2g = v2g
        self.shortfall_cost_per_kwh = shortfall_cost_per_kwh
        self._current: FlexArrays | None = None
        self._kw: FloatArray = np.zeros((0, 0))

    def model(self, steps: int, h: float) -> FlexModel | None:
        """The LP columns for ``steps`` steps of ``h`` hours (None without columns)."""
        if not self.columns:
            return None
        model = FlexModel(
            self.columns, steps, h, shortfall_cost_per_kwh=self.shortfall_cost_per_kwh, v2g=self.v2g
        )
        model.source = self
        return model

    def arrays(self, inputs: DispatchInputs, steps: int) -> FlexArrays:
        """The validated sessions of ``inputs`` (raises InvalidDispatchInputsError)."""
        return session_arrays(inputs, self.columns, steps, v2g=self.v2g)

    def prepare(self, inputs: DispatchInputs, steps: int, a: DispatchArrays) -> DispatchArrays:
        """Validate this solve's sessions (the model takes them when its parameters are set,
        :meth:`FlexModel.refresh`); returns ``a`` with the grid's reach widened."""
        f = self._current = self.arrays(inputs, steps)
        return widen_reach(a, f, inputs)

    @property
    def current(self) -> FlexArrays | None:
        """The sessions of the solve in progress."""
        return self._current

    def collect(self, model: FlexModel | None, slack: dict[str, float], steps: int) -> None:
        """Read the sessions' power and put their shortfalls into ``slack``."""
        if self._current is not None:
            self._kw = session_power_kw(model, self._current, slack, steps, tol_kw=_TOL_KW)

    def attach(self, plan: Plan) -> Plan:
        """``plan`` with the sessions' power (and their draw in its grid)."""
        f, self._current = self._current, None
        if f is None or not f.ids or plan.rung.value > 2:
            return plan
        return with_sessions(plan, f, self._kw)


def widen_reach(a: DispatchArrays, f: FlexArrays, inputs: DispatchInputs) -> DispatchArrays:
    """``a`` with "no limit" widened by the sessions' power: validate_inputs bounds an absent
    site limit by what the grid can carry without them (they can draw that much more, and V2G
    give it); a configured limit stays as it is."""
    if not f.ids:
        return a
    reach = 2.0 * float(f.ub_ch.sum(0).max() + f.ub_dis.sum(0).max())
    return replace(
        a,
        imp_lim=min(inputs.import_limit_w / 1000.0, a.imp_lim + reach),
        exp_lim=min(inputs.export_limit_w / 1000.0, a.exp_lim + reach),
    )


def session_power_kw(
    model: FlexModel | None, f: FlexArrays, slack: dict[str, float], steps: int, *, tol_kw: float
) -> FloatArray:
    """Per-session power (S', T) kW, battery sign, held to each session's limits (the charger
    applies one signed number); each shortfall above ``tol_kw`` goes into ``slack`` as
    ``session_shortfall_wh[<id>]`` (battery Wh)."""
    if model is None or not f.ids:
        return np.zeros((0, steps))
    n = len(f.ids)
    short = model.shortfall_kwh()[:n] * f.efficiency[:n] * 1000.0
    for k, sid in enumerate(f.ids):
        if short[k] > tol_kw * 1000.0:
            slack[f"session_shortfall_wh[{sid}]"] = float(short[k])
    power: FloatArray = np.clip(model.power_kw()[:n], -f.ub_ch[:n], f.ub_dis[:n])
    return power


def with_sessions(plan: Plan, f: FlexArrays, session_kw: FloatArray) -> Plan:
    """The plan with each session's power (W); its grid includes them (one meter)."""
    if not f.ids:
        return plan
    total = session_kw.sum(axis=0) * 1000.0
    grid = tuple(g - x for g, x in zip(plan.grid_w, total, strict=True))
    sessions = {sid: tuple(map(float, session_kw[k] * 1000.0)) for k, sid in enumerate(f.ids)}
    return replace(plan, grid_w=grid, session_power_w=sessions)
