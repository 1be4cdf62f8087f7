"""The systemd units: `systemd-analyze verify` is clean and the offline security score is low.

Both commands run offline, without systemd as PID 1 (CI runs in a container), and use the
real ``systemd-analyze`` of the Debian systemd package (``make sysdeps``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from essd.config import DEFAULT_CONFIG_PATH, ControlConfig
from tests.support.systemd import SCORE_RE, UNIT_DIR, systemd_analyze, unit_settings

UNITS = ["essd.service", "essd-sim.service"]
INSTALLED_ESSD = "/opt/essd/venv/bin/essd"
MAX_EXPOSURE = 1.5


def _venv_essd() -> Path:
    """The ``essd`` console script of the environment running the tests."""
    essd = Path(sys.executable).with_name("essd")
    assert essd.exists(), f"{essd}: install essd into the test environment (make venv)"
    return essd


def _copy_for_verify(name: str, dest: Path, drop_ins: tuple[str, ...] = ()) -> Path:
    """A copy of a unit whose ExecStart= names an executable that exists on this machine.

    `systemd-analyze verify` fails a unit whose ExecStart= program is missing, and the units
    name the install location /opt/essd/venv/bin/essd, which a test machine does not have.
    Only that path is rewritten (to this environment's essd script); every other line is
    verified as shipped.
    """
    text = (UNIT_DIR / name).read_text()
    assert INSTALLED_ESSD in text
    unit = dest / name
    unit.write_text(text.replace(INSTALLED_ESSD, str(_venv_essd())))
    if drop_ins:
        d = dest / f"{name}.d"
        d.mkdir()
        for conf in drop_ins:
            shutil.copy(UNIT_DIR / conf, d / conf)
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", unit.name],
        check=False,
        cwd=unit.parent,  # verify looks for the drop-in directory beside the unit
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_clean(name: str, tmp_path: Path) -> None:
    result = _verify(_copy_for_verify(name, tmp_path))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_unit_with_serial_drop_in_verifies_clean(tmp_path: Path) -> None:
    result = _verify(_copy_for_verify("essd.service", tmp_path, ("serial-port.conf",)))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_verify_reads_drop_ins_and_reports_their_mistakes(tmp_path: Path) -> None:
    """A misspelt key in a drop-in is reported, so "clean" above covers the drop-in too."""
    unit = _copy_for_verify("essd.service", tmp_path, ("serial-port.conf",))
    conf = tmp_path / "essd.service.d" / "serial-port.conf"
    conf.write_text(conf.read_text().replace("DevicePolicy=", "DevicePolcy="))
    result = _verify(unit)
    assert "DevicePolcy" in result.stderr


def test_verify_does_catch_a_missing_executable(tmp_path: Path) -> None:
    """Why the copies above rewrite ExecStart=: verify fails on the install path here."""
    unit = tmp_path / "essd.service"
    text = (UNIT_DIR / "essd.service").read_text()
    unit.write_text(text.replace(INSTALLED_ESSD, str(tmp_path / "no-such-essd")))
    result = _verify(unit)
    assert result.returncode != 0
    assert "no-such-essd" in result.stderr


def exposure(unit_dir: Path, name: str) -> tuple[float, str]:
    """The overall exposure score of `systemd-analyze security --offline=true`, and its report."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", name],
        check=False,
        cwd=unit_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = SCORE_RE.search(result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


def _copy(name: str, dest: Path, drop_ins: tuple[str, ...] = ()) -> Path:
    shutil.copy(UNIT_DIR / name, dest / name)
    if drop_ins:
        d = dest / f"{name}.d"
        d.mkdir()
        for conf in drop_ins:
            shutil.copy(UNIT_DIR / conf, d / conf)
    return dest


@pytest.mark.parametrize(
    ("name", "drop_ins"),
    [
        ("essd.service", ()),
        ("essd.service", ("serial-port.conf",)),  # a gateway with a local RS-485 port
        ("essd-sim.service", ()),
    ],
)
def test_security_exposure_is_low(name: str, drop_ins: tuple[str, ...], tmp_path: Path) -> None:
    score, report = exposure(_copy(name, tmp_path, drop_ins), f"./{name}")
    print(f"systemd-analyze security: {name} {' '.join(drop_ins)} exposure {score}")
    assert score <= MAX_EXPOSURE
    if drop_ins:  # the analysis did read the drop-in: its device list is in the report
        assert "char-ttyUSB:rw" in report


def test_security_score_parsing_sees_an_exposed_unit(tmp_path: Path) -> None:
    """The same measurement on an unhardened unit scores high, so the bound means something."""
    (tmp_path / "bare.service").write_text(
        f"[Service]\nType=notify\nExecStart={_venv_essd()} run\nDynamicUser=yes\n"
    )
    assert exposure(tmp_path, "./bare.service")[0] > 5.0


def _seconds(value: str) -> float:
    """A systemd time span such as ``30s``, ``2min`` or ``1min 30s`` in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "min": 60.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_essd_unit_runs_the_daemon_on_the_default_config() -> None:
    s = unit_settings(UNIT_DIR / "essd.service")
    assert s["ExecStart"] == [f"{INSTALLED_ESSD} run --config {DEFAULT_CONFIG_PATH}"]
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["essd"]
    assert s["ConfigurationDirectory"] == [DEFAULT_CONFIG_PATH.parent.name]
    unit = unit_settings(UNIT_DIR / "essd.service", section="Unit")
    assert "StartLimitIntervalSec" in unit
    assert "StartLimitBurst" in unit


def test_watchdog_and_stop_timeouts_fit_the_cycle_and_the_safe_stop() -> None:
    s = unit_settings(UNIT_DIR / "essd.service")
    cycle = ControlConfig().cycle_period_s
    watchdog = _seconds(s["WatchdogSec"][-1])
    # essd pings at half the timeout and only from healthy cycles: the ping interval must
    # not be shorter than a cycle, and a stuck loop must be caught within a few cycles.
    assert cycle <= watchdog / 2
    assert watchdog <= 3 * cycle
    # The safe stop writes every device within 5 s; systemd must not SIGKILL before.
    assert _seconds(s["TimeoutStopSec"][-1]) >= 2 * 5.0


@pytest.mark.parametrize("name", UNITS)
def test_proc_stays_readable_for_process_metrics(name: str) -> None:
    """ProcSubset=pid would hide /proc/stat, which the process metrics need."""
    s = unit_settings(UNIT_DIR / name)
    assert s.get("ProcSubset", ["all"])[-1] == "all"
