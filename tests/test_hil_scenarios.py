"""Every shipped HIL scenario runs the real control core against the simulated site over
loopback Modbus and meets its expectations, with no limit violation and no unsafe setpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from essd.hil.report import write_report
from essd.hil.runner import RunResult, run_scenario
from essd.hil.scenario import load_scenario
from hil_sim.faults import FAULT_KINDS
from tests.support.hil import SHIPPED

SCENARIOS = sorted(SHIPPED.glob("*.yaml"))
# The campaigns have their own, stricter tests (below and in test_hil_hostile.py): one run of
# each is enough for the time budget.
CAMPAIGNS = {
    "fault-campaign",
    "hostile-campaign",
    "frozen-zero-export",
    "meter-glitches",
    "wall-clock-steps",
}
DAYS = [p for p in SCENARIOS if p.stem not in CAMPAIGNS]
# Fault kinds the fault campaign leaves to the campaigns of test_hil_hostile.py.
ELSEWHERE = {"meter_glitch", "meter_drift", "safe_mode_ignored"}

# Faults after which the daemon must hold the faulted unit (or, for the meter, every unit) at
# 0 W for the whole fault: it cannot trust or reach the device.
MUST_IDLE = {
    "comm_loss",
    "exception_responses",
    "bms_fault",
    "meter_loss",
    "unplugged",
    "connection_refused",
}


def test_the_expected_scenarios_are_shipped() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {
        "household-tou",
        "industrial-peak-shaving",
        "zero-export",
        "negative-prices",
        "camping-unplugged",
        "fault-campaign",
        "household-learned-2d",
    } | CAMPAIGNS <= names


@pytest.mark.slow
async def test_learned_forecasts_at_a_pv_exporting_site_keep_the_optimizer_in_charge(
    tmp_path: Path,
) -> None:
    # Two days on the daemon's own learned net load, negative for hours at midday: every
    # cycle solved (before, negative net load crashed the cycle with no report).
    result = await _run(SHIPPED / "household-learned-2d.yaml", tmp_path)
    assert result.failures == []
    assert result.kpis.cycles == 576
    exporting = [c for c in result.cycles if c.grid_belief_w is not None and c.grid_belief_w < 0]
    assert len(exporting) > 24  # hours of export, on both days
    assert {c.time // 86_400 for c in exporting} == {c.time // 86_400 for c in result.cycles}
    causes = {c.cause for c in result.cycles}
    assert causes <= {"optimal", "soft_constraints"}, causes


async def _run(path: Path, tmp_path: Path) -> RunResult:
    scenario, settings = load_scenario(path)
    return await run_scenario(scenario, settings, workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("path", DAYS, ids=[p.stem for p in DAYS])
async def test_shipped_scenario_passes(path: Path, tmp_path: Path) -> None:
    result = await _run(path, tmp_path)
    k = result.kpis
    assert result.failures == []
    assert k.violations == 0, k.violation_examples
    assert k.unsafe_writes == 0
    assert k.cycles == result.scenario.cycles
    # The run is the simulated duration, sampled without gaps.
    assert k.simulated_s == pytest.approx(result.scenario.duration)
    assert k.savings > 0
    assert k.optimum_status.startswith("rung 1")


@pytest.mark.slow
async def test_fault_campaign_touches_every_fault_kind_and_idles_what_it_cannot_trust(
    tmp_path: Path,
) -> None:
    result = await _run(SHIPPED / "fault-campaign.yaml", tmp_path)
    assert {f.kind for f in result.scenario.faults} == set(FAULT_KINDS) - ELSEWHERE
    k = result.kpis
    assert result.failures == []
    assert k.violations == 0, k.violation_examples
    assert k.unsafe_writes == 0
    assert k.cycles == result.scenario.cycles
    for f in result.kpis.faults:
        assert f["cycles"] >= 2, f
        assert f["unsafe_writes"] == [], f
        assert f["rungs"], f  # the rung taken is reported for each fault
        if f["kind"] in MUST_IDLE:
            assert f["safe_idle_cycles"] == f["cycles"], f
            assert f["setpoint_w_max"] == 0.0, f
        if f["kind"] == "bms_fault":
            assert f["device_states"] == ["fault"]
    # The daemon saw the trouble on the wire.
    assert result.kpis.modbus_errors > 0
    # The report lists every fault with its rung and unsafe writes, and shades it on the plots.
    text = write_report(result, tmp_path / "report").read_text()
    for f in result.scenario.faults:
        assert f"| {f.kind} | {f.device} |" in text
    assert "| unsafe writes |" in text
