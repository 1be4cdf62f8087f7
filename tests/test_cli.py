"""The `essd` command line: profiles, version, logging, and refusing bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from essd import __version__
from essd.cli import main
from essd.logs import configure_logging


def test_profiles_list_names_every_shipped_profile_with_its_class(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["profiles", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line.split()[1] for line in out}
    assert by_name["industrial-sunspec-pcs"] == "industrial"
    assert by_name["household-hybrid-forcible"] == "household"
    assert by_name["household-ess-setpoint"] == "household"
    assert by_name["portable-power-station"] == "portable"
    assert by_name["site-meter"] == "meter"
    assert all(len(line.split(maxsplit=2)) == 3 for line in out)  # and a description


def test_profiles_show_prints_the_profile_and_refuses_unknown_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["profiles", "show", "site-meter"]) == 0
    out = capsys.readouterr().out
    assert "name: site-meter" in out
    assert "grid_power_w" in out
    assert main(["profiles", "show", "no-such-unit"]) == 2
    assert "profile 'no-such-unit' not found" in capsys.readouterr().err


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "essd", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"essd {__version__}"


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    try:
        logging.getLogger("essd.test").warning('device "x": %s', "quoted\nnewline")
    finally:
        configure_logging("WARNING")
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["msg"] == 'device "x": quoted\nnewline'


def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "essd.toml"
    bad.write_text('[site]\nid = "s"\ngrid_import_limit_w = -5\ngrid_export_limit_w = 0\n')
    out = subprocess.run(
        [sys.executable, "-m", "essd", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert f"{bad}: site.grid_import_limit_w:" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "essd", "run", "--config", str(bad), "--sim-start", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--sim-start/--sim-anchor: need --sim-speed" in out.stderr


def test_help_loads_neither_the_optimizer_nor_pydantic_nor_the_simulator() -> None:
    # `essd --help` answers without the heavy imports (their cost is in `make bench`,
    # cli.help_s); checked by what got imported, not by timing.
    code = (
        "import sys, essd.cli\n"
        "essd.cli.build_parser().format_help()\n"
        "heavy = ('cvxpy', 'highspy', 'pydantic', 'numpy', 'pymodbus', 'hil_sim.runner',\n"
        "         'asyncio')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
