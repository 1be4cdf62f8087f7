"""A scenario file with errors is rejected, naming the file and the dotted field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from essd.cli import main
from essd.hil.scenario import ScenarioError, load_scenario
from tests.support.hil import SMALL, write_scenario


def _site(**settings: Any) -> dict[str, Any]:
    site = dict(SMALL["site"])
    site["settings"] = {**site["settings"], **settings}
    return site


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {"durration": "2h"}, "durration: unknown key"),
    ("missing duration", {"duration": None}, "duration: Field required"),
    ("bad duration text", {"duration": "two hours"}, "duration: not a duration"),
    ("cycle longer than the daemon allows", {"cycle_period": "10m"}, "cycle_period:"),
    ("start without offset", {"start": "2026-07-01T17:00:00"}, "start: needs a UTC offset"),
    (
        "unknown fault kind",
        {"faults": [{"kind": "lightning", "device": "home", "at": "10m", "duration": "5m"}]},
        "faults.0.kind:",
    ),
    (
        "delay without delay_s",
        {"faults": [{"kind": "delay", "device": "home", "at": "10m", "duration": "5m"}]},
        "faults.0.delay_s: required for kind delay",
    ),
    (
        "fault on an unknown device",
        {"faults": [{"kind": "comm_loss", "device": "pcs9", "at": "10m", "duration": "5m"}]},
        "faults.0.device: no device 'pcs9'",
    ),
    (
        "meter loss on a battery",
        {"faults": [{"kind": "meter_loss", "device": "home", "at": "10m", "duration": "5m"}]},
        "faults.0.kind: meter_loss needs a meter",
    ),
    (
        "fault outlasting the scenario",
        {"faults": [{"kind": "comm_loss", "device": "home", "at": "90m", "duration": "1h"}]},
        "faults.0.duration: the fault outlasts the scenario",
    ),
    (
        "negative site limit",
        {
            "site": _site(
                site={
                    "id": "x",
                    "timezone": "UTC",
                    "grid_import_limit_w": -5,
                    "grid_export_limit_w": 0,
                }
            )
        },
        "site.settings.site.grid_import_limit_w:",
    ),
    (
        "unknown device key",
        {"site": _site(devices=[{"id": "home", "profile": "household-hybrid-forcible", "x": 1}])},
        "site.settings.devices.0.x: unknown key",
    ),
    (
        "series from both a file and inline",
        {"series": {"file": "a.csv", "inline": SMALL["series"]["inline"]}},
        "series.file: give either series.file or series.inline",
    ),
    (
        "inline series of uneven lengths",
        {"series": {"inline": {**SMALL["series"]["inline"], "pv_w": [1, 2]}}},
        "series.inline.pv_w: has 2 values, load_w has 5",
    ),
    (
        "negative load",
        {"series": {"inline": {**SMALL["series"]["inline"], "load_w": [1, -2, 3, 4, 5]}}},
        "series.inline.load_w.1:",
    ),
    (
        "expectation out of range",
        {"expect": {"worst_rung": 7}},
        "expect.worst_rung:",
    ),
]


@pytest.mark.parametrize(("case", "changes", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_malformed_scenario_is_rejected_naming_file_and_field(
    tmp_path: Path, case: str, changes: dict[str, Any], expected: str
) -> None:
    path = write_scenario(tmp_path / "bad.yaml", **changes)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    lines = info.value.problems
    assert any(line.startswith(f"{path}: ") and expected in line for line in lines), lines


def test_a_missing_series_file_is_named(tmp_path: Path) -> None:
    path = write_scenario(tmp_path / "bad.yaml", series={"file": "nowhere.csv"})
    with pytest.raises(ScenarioError, match=r"bad.yaml: series.file: .*nowhere.csv: cannot read"):
        load_scenario(path)


def test_not_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"bad.yaml: not valid YAML"):
        load_scenario(path)


def test_cli_exits_2_and_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_scenario(tmp_path / "bad.yaml", cycle_period="1 fortnight")
    assert main(["hil", "run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: cycle_period: not a duration" in err
