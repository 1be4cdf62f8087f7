"""The report of a real (short) run: kpis.json, readable PNG plots, Markdown; the CLI's exit
codes and the run-all table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from essd.cli import main
from essd.hil.cli import RunProgress
from essd.hil.report import PLOTS, make_figures, write_report
from essd.hil.runner import RunResult, run_scenario
from essd.hil.scenario import load_scenario
from tests.support.hil import SMALL, write_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def small_run(tmp_path: Path) -> RunResult:
    scenario, settings = load_scenario(write_scenario(tmp_path / "small.yaml"))
    return await run_scenario(scenario, settings, workdir=tmp_path / "work")


async def test_report_writes_kpis_plots_and_markdown(small_run: RunResult, tmp_path: Path) -> None:
    out = tmp_path / "report"
    md = write_report(small_run, out)
    kpis = json.loads((out / "kpis.json").read_text())
    assert kpis["passed"] is True
    assert kpis["scenario"] == "small-household"
    assert kpis["cycles"] == 24
    for key in (
        "cost",
        "baseline_cost",
        "savings",
        "savings_vs_optimum",
        "peak_import_w",
        "self_consumption_ratio",
        "co2_kg",
        "battery_throughput_wh",
        "equivalent_full_cycles",
        "violations",
        "rung_counts",
        "modbus_errors",
        "device_writes",
    ):
        assert key in kpis
    text = md.read_text()
    for name in PLOTS:
        png = out / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000  # a drawn figure, not an empty canvas
        assert f"![{name}]({name}.png)" in text
    assert "| savings (corrected for stored energy) |" in text
    assert "| uncorrected savings (baseline - cost) |" in text


def test_figures_have_titles_units_and_legends(small_run: RunResult) -> None:
    figs = make_figures(small_run)
    assert set(figs) == set(PLOTS)
    expected_y = {
        "soc": "State of charge (%)",
        "power": "Power (kW, > 0 discharges)",
        "grid": "Grid power (kW, > 0 imports)",
        "price": "Price (CNY/kWh)",
    }
    for name, fig in figs.items():
        if name == "peak":
            continue  # two panels on a clock-time axis: below
        ax = fig.axes[0]
        assert ax.get_ylabel() == expected_y[name]
        assert ax.get_xlabel().startswith("Time from start (h")
        assert ax.get_title().startswith("small-household: ")
        legend = ax.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()]
        assert ax.lines, name  # something is drawn
    top, bottom = figs["peak"].axes
    assert top.get_ylabel() == "Power (kW)"
    assert {t.get_text() for t in top.get_legend().get_texts()} == {"load", "PV"}
    assert bottom.get_ylabel() == "Import (kW)"
    assert bottom.get_xlabel().startswith("Local time")
    assert {"billed 15-minute import", "billing period's peak", "peak without battery"} <= {
        t.get_text() for t in bottom.get_legend().get_texts()
    }
    labels = [t.get_text() for t in figs["grid"].axes[0].get_legend().get_texts()]
    assert {"grid (with essd)", "grid without battery", "import limit", "export limit"} <= set(
        labels
    )
    assert figs["price"].axes[1].get_ylabel() == "Grid carbon intensity (g CO2/kWh)"
    soc = figs["soc"].axes[0].lines[0].get_ydata()
    assert 0 <= min(soc) <= max(soc) <= 100


def test_a_failed_expectation_exits_1_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(
        tmp_path / "greedy.yaml",
        expect={"max_violations": 0, "min_savings": 1e6, "max_peak_import_w": 10},
    )
    report = tmp_path / "report"
    assert main(["hil", "run", str(path), "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "expectation failed: min_savings: saved" in err
    assert "expectation failed: max_peak_import_w: peak import" in err
    assert "max_violations" not in err
    kpis = json.loads((report / "kpis.json").read_text())
    assert kpis["passed"] is False
    assert len(kpis["failures"]) == 2
    assert "## Failed expectations" in (report / "report.md").read_text()


def test_run_all_prints_one_row_per_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    write_scenario(folder / "a.yaml")
    write_scenario(folder / "b.yaml", name="small-greedy", expect={"min_savings": 1e6})
    assert main(["hil", "run-all", str(folder)]) == 1
    out = capsys.readouterr().out.splitlines()
    header = out[-3].split()
    assert header == [
        "name",
        "result",
        "cost",
        "baseline",
        "savings",
        "violations",
        "worst_rung",
        "wall_s",
    ]
    rows = {line.split()[0]: line.split() for line in out[-2:]}
    assert rows["small-household"][1] == "pass"
    assert rows["small-greedy"][1] == "FAIL"
    assert rows["small-household"][5] == "0"


def test_run_all_of_an_empty_folder_is_invalid(tmp_path: Path) -> None:
    assert main(["hil", "run-all", str(tmp_path)]) == 2


def test_the_small_scenario_is_what_the_tests_think(small_run: RunResult) -> None:
    assert small_run.scenario.cycles == 24
    assert SMALL["expect"]["min_savings"] <= small_run.kpis.savings


async def test_a_running_clock_covers_the_scenario_too(tmp_path: Path) -> None:
    # 600 simulated seconds per real second: ten minutes of two five-minute cycles in ~1 s.
    path = write_scenario(tmp_path / "running.yaml", speed=600, duration="10m", expect={})
    scenario, settings = load_scenario(path)
    result = await run_scenario(scenario, settings, workdir=tmp_path / "work")
    assert result.kpis.cycles == 2
    assert result.kpis.violations == 0
    # Samples hold until the next one: the time after the first cycle is covered to the end.
    last = result.samples[-1]
    assert last.time + last.dt_s == pytest.approx(scenario.start_epoch + scenario.duration)


def test_a_run_shows_progress_and_reports_one_wall_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(tmp_path / "small.yaml")
    report = tmp_path / "report"
    assert main(["hil", "run", str(path), "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    progress = [ln for ln in err.splitlines() if ": simulated " in ln]
    # Not a terminal: one line per tenth of the simulated time, in order, up to the last
    # cycle (which starts one period before the end).
    assert 5 <= len(progress) <= 11, err
    shares = [int(ln.split("(")[1].split("%")[0]) for ln in progress]
    assert shares == sorted(shares)
    assert shares[-1] >= 90
    kpis = json.loads((report / "kpis.json").read_text())
    wall = f"{kpis['wall_s']:.1f} s wall"
    (summary,) = [ln for ln in out.splitlines() if ln.startswith("small-household: pass")]
    assert summary.endswith(wall)
    assert wall in (report / "report.md").read_text()


def test_progress_redraws_in_place_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = RunProgress("x", 0.0, 3600.0, out=out)
    assert progress.line(1800.0, progress._wall0 + 2.0) == (
        "x: simulated 0.5 of 1.0 h (50%), 2 s wall, ETA 2 s"
    )
    progress.close()
    assert out.getvalue() == ""  # nothing drawn, nothing to clear
