"""Key figures of a HIL run, from the simulator's true state (never from the daemon's belief).

Everything is integrated from :class:`Sample`s: the true site state held over ``dt_s``
seconds (the runner samples at least every minute and right after every cycle). Costs use one
definition for the run, the no-battery baseline and the perfect-foresight optimum:

    cost = sum(import kWh x import price - export kWh x export price)
         + carbon price x kg CO2 (import kWh x grid intensity)
         + demand charge per kW x peak of the per-step average import

Savings are corrected for the change in stored energy, valued by the optimum itself (as in
``essd backtest``): ``optimum_cost`` ends the run at least at the initial SoC, the optimum
re-solved to the run's final SoC (``optimum_cost_to_end_soc``) shows what the energy the run
gained or lost was worth, and

    savings = baseline_cost - cost + optimum_cost_to_end_soc - optimum_cost

so a run that empties its battery does not count the emptied energy as savings
(``uncorrected_savings`` is ``baseline_cost - cost``, for comparison).

Units: W, Wh, kWh where named; prices per kWh in the tariff's currency; CO2 in kg.
Battery W > 0 discharges into the site; grid W > 0 imports.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hil_sim.truth import POWER_TOL_RATIO, POWER_TOL_W, Limits, SiteTruth, Violation, violations_in


@dataclass(frozen=True, slots=True)
class Sample:
    """The true site state, held for ``dt_s`` seconds from ``time``, and the true prices.

    ``after_cycle`` marks the sample taken right after a cycle wrote its setpoints: commanded
    powers are judged there (between cycles the daemon has not yet seen a change).
    """

    time: float
    dt_s: float
    truth: SiteTruth
    import_price: float
    export_price: float
    carbon_g_per_kwh: float
    after_cycle: bool = False
    active_faults: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CycleRecord:
    """One control cycle as the daemon published it, plus the faults active at the time."""

    cycle: int
    time: float
    rung: int
    reason: str
    setpoints_w: Mapping[str, float]
    device_states: Mapping[str, str]
    grid_belief_w: float | None
    modbus_errors: int
    device_writes: int
    active_faults: tuple[str, ...] = ()
    setpoint_sources: Mapping[str, str] = field(default_factory=dict)
    cause: str = ""  # the plan's typed cause (essd.domain.PlanCause value)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Tariff terms beyond the per-kWh prices in the samples."""

    carbon_price_per_kg: float = 0.0
    demand_charge_per_kw: float = 0.0
    demand_window_s: float = 900.0
    export_limiter: bool = False
    export_limit_w: float = math.inf


@dataclass(frozen=True, slots=True)
class GridCost:
    """Cost of one grid trace and its parts."""

    total: float
    energy: float
    carbon_kg: float
    carbon_cost: float
    demand_charge: float
    peak_import_w: float
    peak_window_import_w: float
    imported_wh: float
    exported_wh: float


@dataclass(frozen=True, slots=True)
class PriceTrace:
    """Times (epoch s) of a trace, each held ``dt_s`` seconds, and the prices in force."""

    times: Sequence[float]
    dt_s: Sequence[float]
    import_price: Sequence[float]
    export_price: Sequence[float]
    carbon_g_per_kwh: Sequence[float]


def grid_cost(grid_w: Sequence[float], trace: PriceTrace, model: CostModel) -> GridCost:
    """The cost of a grid power trace (W, > 0 imports) over ``trace``."""
    energy = carbon = imp_wh = exp_wh = 0.0
    windows: dict[int, float] = {}
    peak = 0.0
    for g, dt, t, pi, pe, ci in zip(
        grid_w,
        trace.dt_s,
        trace.times,
        trace.import_price,
        trace.export_price,
        trace.carbon_g_per_kwh,
        strict=True,
    ):
        kwh_in = max(g, 0.0) * dt / 3.6e6
        kwh_out = max(-g, 0.0) * dt / 3.6e6
        energy += kwh_in * pi - kwh_out * pe
        carbon += kwh_in * ci / 1000.0
        imp_wh += kwh_in * 1000.0
        exp_wh += kwh_out * 1000.0
        if dt > 0:
            peak = max(peak, g)
            w = int(t // model.demand_window_s)
            windows[w] = windows.get(w, 0.0) + kwh_in * 1000.0
    window_peak = max((wh * 3600.0 / model.demand_window_s for wh in windows.values()), default=0.0)
    demand = model.demand_charge_per_kw * window_peak / 1000.0
    carbon_cost = carbon * model.carbon_price_per_kg
    return GridCost(
        total=energy + carbon_cost + demand,
        energy=energy,
        carbon_kg=carbon,
        carbon_cost=carbon_cost,
        demand_charge=demand,
        peak_import_w=max(peak, 0.0),
        peak_window_import_w=window_peak,
        imported_wh=imp_wh,
        exported_wh=exp_wh,
    )


def baseline_grid_w(truth: SiteTruth, model: CostModel) -> float:
    """Grid power of the same site with no battery (PV curtailed by a limiter if it has one)."""
    pv = truth.pv_available_w
    if model.export_limiter:
        pv = min(pv, max(0.0, truth.load_w + model.export_limit_w))
    return truth.load_w - pv


@dataclass(frozen=True, slots=True)
class Kpis:
    """The figures written to ``kpis.json`` (see the module docstring for the cost)."""

    scenario: str
    cycles: int
    simulated_s: float
    wall_s: float
    cost: float
    energy_cost: float
    demand_charge: float
    carbon_cost: float
    baseline_cost: float
    savings: float
    uncorrected_savings: float
    cost_ratio: float | None
    optimum_cost: float | None
    optimum_cost_to_end_soc: float | None
    optimum_savings: float | None
    savings_vs_optimum: float | None
    optimum_status: str
    peak_import_w: float
    peak_window_import_w: float
    baseline_peak_window_import_w: float
    imported_wh: float
    exported_wh: float
    pv_wh: float
    pv_curtailed_wh: float
    self_consumption_ratio: float | None
    baseline_self_consumption_ratio: float | None
    co2_kg: float
    baseline_co2_kg: float
    battery_charged_wh: float
    battery_discharged_wh: float
    battery_throughput_wh: float
    equivalent_full_cycles: float
    final_soc: Mapping[str, float]
    max_import_excess_w: float
    max_export_excess_w: float
    violations: int
    violations_by_kind: Mapping[str, int]
    violation_examples: Sequence[Mapping[str, Any]]
    unsafe_writes: int
    rung_counts: Mapping[str, int]
    worst_rung: int
    modbus_errors: int
    device_writes: int
    faults: Sequence[Mapping[str, Any]] = field(default_factory=list)
    # Runner-level events (essd.hil.hostile), reported like faults.
    events: Sequence[Mapping[str, Any]] = field(default_factory=list)
    # What essd itself counted (totals, billing peak), to compare with the truth above.
    daemon_totals: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def violations_of(samples: Sequence[Sample], limits: Limits) -> list[Violation]:
    """Every limit the true state broke, sample by sample (:func:`hil_sim.truth.violations_in`):
    commanded powers on the samples right after a cycle, the grid on samples that last."""
    return [
        v
        for s in samples
        for v in violations_in(s.truth, limits, commands=s.after_cycle, site=s.dt_s > 0)
    ]


def unsafe_writes(samples: Sequence[Sample], cycles: Sequence[CycleRecord]) -> list[str]:
    """Setpoints a cycle let through that the true state forbade, one line each.

    Unsafe: non-zero power for a unit in BMS alarm or away, or beyond its true live limits.
    """
    after = {s.time: s for s in samples if s.after_cycle}
    out = []
    for c in cycles:
        s = after.get(c.time)
        if s is None:
            continue
        for dev, p in c.setpoints_w.items():
            b = s.truth.batteries.get(dev)
            if b is None:
                continue
            tol = POWER_TOL_W
            if p != 0.0 and (b.alarm or not b.available):
                out.append(f"cycle {c.cycle}: {dev} told {p:.0f} W while in alarm or away")
            elif p > b.max_discharge_w * (1 + POWER_TOL_RATIO) + tol or -p > (
                b.max_charge_w * (1 + POWER_TOL_RATIO) + tol
            ):
                out.append(f"cycle {c.cycle}: {dev} told {p:.0f} W beyond its live limits")
    return out


def compute_kpis(
    *,
    scenario: str,
    samples: Sequence[Sample],
    cycles: Sequence[CycleRecord],
    limits: Limits,
    model: CostModel,
    wall_s: float,
    optimum_cost: float | None = None,
    optimum_cost_to_end_soc: float | None = None,
    optimum_status: str = "not solved",
    faults: Sequence[Mapping[str, Any]] = (),
    events: Sequence[Mapping[str, Any]] = (),
    daemon_totals: Mapping[str, float] | None = None,
) -> Kpis:
    """All figures of a run from its true samples and its cycle records."""
    dts = [s.dt_s for s in samples]
    trace = PriceTrace(
        times=[s.time for s in samples],
        dt_s=dts,
        import_price=[s.import_price for s in samples],
        export_price=[s.export_price for s in samples],
        carbon_g_per_kwh=[s.carbon_g_per_kwh for s in samples],
    )
    run = grid_cost([s.truth.grid_w for s in samples], trace, model)
    base = grid_cost([baseline_grid_w(s.truth, model) for s in samples], trace, model)
    pv_wh = sum(s.truth.pv_w * s.dt_s for s in samples) / 3600.0
    pv_avail = sum(s.truth.pv_available_w * s.dt_s for s in samples) / 3600.0
    base_pv = (
        pv_avail
        - sum(
            (s.truth.pv_available_w - (s.truth.load_w - baseline_grid_w(s.truth, model))) * s.dt_s
            for s in samples
        )
        / 3600.0
    )
    charged = discharged = 0.0
    capacity = 0.0
    final: dict[str, float] = {}
    for s in samples:
        for b in s.truth.batteries.values():
            charged += max(-b.power_w, 0.0) * s.dt_s / 3600.0
            discharged += max(b.power_w, 0.0) * s.dt_s / 3600.0
    if samples:
        for dev, b in samples[-1].truth.batteries.items():
            capacity += b.capacity_wh
            final[dev] = round(b.soc, 4)
    viol = violations_of(samples, limits)
    unsafe = unsafe_writes(samples, cycles)
    rungs = Counter(str(c.rung) for c in cycles)
    uncorrected = base.total - run.total
    savings = uncorrected
    if optimum_cost is not None and optimum_cost_to_end_soc is not None:
        # What the stored energy the run gained (lost) was worth to the optimum.
        savings += optimum_cost_to_end_soc - optimum_cost
    opt_savings = None if optimum_cost is None else base.total - optimum_cost
    vs_opt = savings / opt_savings if opt_savings is not None and opt_savings > 1e-6 else None
    last = cycles[-1] if cycles else None
    return Kpis(
        scenario=scenario,
        cycles=len(cycles),
        simulated_s=sum(dts),
        wall_s=wall_s,
        cost=run.total,
        energy_cost=run.energy,
        demand_charge=run.demand_charge,
        carbon_cost=run.carbon_cost,
        baseline_cost=base.total,
        savings=savings,
        uncorrected_savings=uncorrected,
        # A ratio means something only when both pay: against a baseline that earns money, or
        # a run that does, it would flip sign or explode.
        cost_ratio=run.total / base.total if base.total > 1e-9 and run.total >= 0 else None,
        optimum_cost=optimum_cost,
        optimum_cost_to_end_soc=optimum_cost_to_end_soc,
        optimum_savings=opt_savings,
        savings_vs_optimum=vs_opt,
        optimum_status=optimum_status,
        peak_import_w=run.peak_import_w,
        peak_window_import_w=run.peak_window_import_w,
        baseline_peak_window_import_w=base.peak_window_import_w,
        imported_wh=run.imported_wh,
        exported_wh=run.exported_wh,
        pv_wh=pv_wh,
        pv_curtailed_wh=max(pv_avail - pv_wh, 0.0),
        self_consumption_ratio=(pv_wh - min(run.exported_wh, pv_wh)) / pv_wh
        if pv_wh > 1e-9
        else None,
        baseline_self_consumption_ratio=(base_pv - min(base.exported_wh, base_pv)) / base_pv
        if base_pv > 1e-9
        else None,
        co2_kg=run.carbon_kg,
        baseline_co2_kg=base.carbon_kg,
        battery_charged_wh=charged,
        battery_discharged_wh=discharged,
        battery_throughput_wh=charged + discharged,
        equivalent_full_cycles=discharged / capacity if capacity > 0 else 0.0,
        final_soc=final,
        max_import_excess_w=max(
            (s.truth.grid_w - limits.import_w for s in samples if s.dt_s > 0), default=0.0
        ),
        max_export_excess_w=max(
            (-s.truth.grid_w - limits.export_w for s in samples if s.dt_s > 0), default=0.0
        ),
        violations=len(viol),
        violations_by_kind=dict(Counter(v.kind for v in viol)),
        violation_examples=[asdict(v) for v in viol[:10]],
        unsafe_writes=len(unsafe),
        rung_counts=dict(sorted(rungs.items())),
        worst_rung=max((c.rung for c in cycles), default=0),
        modbus_errors=last.modbus_errors if last else 0,
        device_writes=last.device_writes if last else 0,
        faults=list(faults),
        events=list(events),
        daemon_totals=dict(daemon_totals or {}),
    )
