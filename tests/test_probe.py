"""``essd probe`` against ``essd sim``: every shipped profile passes; a unit whose register
carries a different scale than the profile says fails naming the register; bad arguments exit 2;
``--write-test`` cycles with read-back, asks first, and leaves the unit idle.

One ``essd sim`` process serves every shipped profile (one device each); ``essd probe`` runs
in-process through :func:`essd.cli.main`, so the exit codes are the command's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from drivers.modbus import Framing, SerialTarget, TcpTarget
from drivers.profile_loader import list_profiles, shipped_profiles_dir
from essd.cli import main
from essd.clock import SimClock
from essd.config import Settings
from essd.probe import TransportError, parse_transport, probe
from hil_sim.profile_image import ProfileImage
from hil_sim.runner import SimulatedSite
from hil_sim.sunspec_image import SunSpecImage

PROFILES = list_profiles()
NAMES = [p.name for p in PROFILES]


def _device(i: int, name: str, framing: str, unit: int, capacity: float) -> str:
    kind = "rtu-over-tcp" if framing == "rtu" else "tcp"
    extra = "\ncapacity_wh = 50000" if capacity == 0 else ""
    return (
        f'[[devices]]\nid = "d{i}"\nprofile = "{name}"\n'
        f'transport = {{ kind = "{kind}", host = "127.0.0.1", port = {16000 + i}, '
        f"unit = {unit} }}{extra}\n"
    )


def _site(tmp: Path, profile_dir: Path | None = None) -> Path:
    head = (
        '[site]\nid = "probe"\ntimezone = "UTC"\ngrid_import_limit_w = 100000\n'
        'grid_export_limit_w = 100000\n[tariff]\ncurrency = "EUR"\nimport_price_per_kwh = 0.3\n'
    )
    if profile_dir is not None:
        head += f'profile_dirs = ["{profile_dir}"]\n'
    body = "".join(
        _device(i, p.name, p.transport.framing, p.transport.unit, p.ratings.capacity_wh)
        for i, p in enumerate(PROFILES)
    )
    path = tmp / "site.toml"
    path.write_text(head + body)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``essd sim`` serving every shipped profile: profile name -> ``--transport`` URL."""
    tmp = tmp_path_factory.mktemp("sim")
    site = _site(tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "essd", "sim", "--site", str(site), "--free-ports"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    urls: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for _ in PROFILES:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "sim ended"
            _, profile, url, _unit = line.split()
            urls[profile] = url  # as `essd sim` prints it: modbus-tcp://, modbus-rtu-over-tcp://
        yield urls
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("name", NAMES)
def test_probe_passes_against_the_simulator(
    name: str, served: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["probe", "--profile", name, "--transport", served[name]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "all checks passed" in out
    profile = next(p for p in PROFILES if p.name == name)
    for spec in profile.registers:  # every register is in the table
        assert spec.name in out


async def test_a_register_with_another_scale_fails_naming_it(tmp_path: Path) -> None:
    # The unit's firmware reports the battery level in 0.01 % where the profile says 0.1 %: the
    # simulator serves that variant, the probe reads with the shipped profile.
    text = (shipped_profiles_dir() / "devices" / "sungrow-sh-rt.yaml").read_text()
    data = yaml.safe_load(text)
    for reg in data["registers"]:
        if reg["name"] == "battery_level":
            reg["scale"] = 0.01
    variant = tmp_path / "profiles"
    variant.mkdir()
    (variant / "sungrow-sh-rt.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        profile_dirs=(variant,),
        devices=[
            {
                "id": "dut",
                "profile": "sungrow-sh-rt",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1502, "unit": 1},
            }
        ],
    )
    shipped = next(p for p in PROFILES if p.name == "sungrow-sh-rt")
    async with SimulatedSite(settings, clock=SimClock(), free_ports=True) as sim:
        ep = sim.endpoints()[0]
        lines: list[str] = []
        report = await probe(shipped, TcpTarget(ep.host, ep.port), 1, out=lines.append)
    assert report.failures, "\n".join(lines)
    assert [f for f in report.failures if f.startswith("battery_level:")] == [
        "battery_level: 500 % outside [0, 100]"
    ], report.failures


def test_exit_1_when_the_device_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["probe", "--profile", "eastron-sdm630", "--transport", "tcp://127.0.0.1:9"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("transport", "expected"),
    [
        ("tcp://10.0.0.5:502", TcpTarget("10.0.0.5", 502, Framing.SOCKET)),
        ("rtu-over-tcp://gw.local:4001", TcpTarget("gw.local", 4001, Framing.RTU)),
        ("rtu:///dev/ttyUSB0?baud=19200&parity=E", SerialTarget("/dev/ttyUSB0", 19200, "E")),
        ("rtu:///dev/ttyUSB1", SerialTarget("/dev/ttyUSB1", 9600, "N")),
        ("modbus-tcp://127.0.0.1:15020", TcpTarget("127.0.0.1", 15020, Framing.SOCKET)),
    ],
)
def test_transport_urls(transport: str, expected: object) -> None:
    assert parse_transport(transport) == expected


@pytest.mark.parametrize(
    "transport",
    [
        "udp://x:1",
        "tcp://host",
        "tcp://:502",
        "rtu://",
        "rtu:///dev/x?baud=fast",
        "rtu:///dev/x?parity=X",
        "rtu:///dev/x?speed=9600",
    ],
)
def test_bad_transport_exits_2(transport: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TransportError):
        parse_transport(transport)
    code = main(["probe", "--profile", "eastron-sdm630", "--transport", transport])
    assert code == 2
    assert "--transport" in capsys.readouterr().err


def test_unknown_profile_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["probe", "--profile", "no-such-device", "--transport", "tcp://127.0.0.1:502"])
    assert code == 2
    assert "no-such-device" in capsys.readouterr().err


async def _sungrow_site() -> SimulatedSite:
    settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "dut",
                "profile": "sungrow-sh-rt",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1502, "unit": 1},
            }
        ],
    )
    return SimulatedSite(settings, clock=SimClock(), free_ports=True)


async def test_write_test_cycles_with_read_back_and_leaves_the_unit_idle() -> None:
    shipped = next(p for p in PROFILES if p.name == "sungrow-sh-rt")
    asked: list[str] = []

    def yes(question: str) -> bool:
        asked.append(question)
        return True

    async with await _sungrow_site() as sim:
        ep = sim.endpoints()[0]
        lines: list[str] = []
        report = await probe(
            shipped,
            TcpTarget(ep.host, ep.port),
            1,
            write_test=True,
            confirm=yes,
            step_s=0.05,
            out=lines.append,
        )
        dev = sim.storage("dut")
        # safe mode: command stop, EMS mode self-consumption
        assert dev.value("charge_discharge_command") == 0xCC
        assert dev.value("ems_mode_selection") == 0
    assert len(asked) == 1
    assert "charge 500 W" in asked[0]
    assert report.failures == [], report.failures
    assert any("write test charge: commanded -500 W, reads -500 W" in line for line in lines)
    assert any("write test discharge: commanded 500 W, reads 500 W" in line for line in lines)
    assert lines[-1] == "write test: unit left idle (safe mode)"


async def test_write_test_declined_writes_nothing() -> None:
    shipped = next(p for p in PROFILES if p.name == "sungrow-sh-rt")
    async with await _sungrow_site() as sim:
        ep = sim.endpoints()[0]
        image = sim.storage("dut").image
        assert isinstance(image, ProfileImage)
        written: list[tuple[str, ...]] = []
        image.add_write_listener(written.append)
        report = await probe(
            shipped,
            TcpTarget(ep.host, ep.port),
            1,
            write_test=True,
            confirm=lambda _: False,
            step_s=0.05,
            out=lambda _: None,
        )
    assert written == []
    assert report.failures == ["write test: not confirmed, nothing written"]


async def test_a_sunspec_unit_with_a_wrong_scale_factor_fails_naming_the_register() -> None:
    settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "pcs",
                "profile": "industrial-sunspec-pcs",
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1502, "unit": 1},
            }
        ],
    )
    shipped = next(p for p in PROFILES if p.name == "industrial-sunspec-pcs")
    async with SimulatedSite(settings, clock=SimClock(), free_ports=True) as sim:
        ep = sim.endpoints()[0]
        ok = await probe(shipped, TcpTarget(ep.host, ep.port), 1, out=lambda _: None)
        image = sim.storage("pcs").image
        assert isinstance(image, SunSpecImage)
        image.set_point("802.SoC_SF", 0)  # firmware says SF 0 where the value is in 0.01 %
        image.set_point("802.SoC", 5000.0)
        dev = sim.storage("pcs")
        dev.faults.frozen = True  # keep the unit's (wrong) registers as they are
        bad = await probe(shipped, TcpTarget(ep.host, ep.port), 1, out=lambda _: None)
    assert ok.failures == []
    assert [f for f in bad.failures if f.startswith("soc:")] == [
        "soc: 5000 % outside [0.0, 100.0]"
    ], bad.failures


async def test_probe_over_a_serial_line(tmp_path: Path) -> None:
    """``rtu:///dev/...``: the simulator serves the unit on one end of a pty pair."""
    settings = Settings(
        site={"id": "one", "timezone": "UTC", "grid_import_limit_w": 1e5, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "deye",
                "profile": "deye-sun-sg04lp3",
                "transport": {"kind": "serial", "port": "/dev/null", "unit": 1},
            }
        ],
    )
    shipped = next(p for p in PROFILES if p.name == "deye-sun-sg04lp3")
    async with SimulatedSite(settings, clock=SimClock(), free_ports=True) as sim:
        path = sim.endpoints()[0].path
        target = parse_transport(f"rtu://{path}?baud=9600&parity=N")
        assert isinstance(target, SerialTarget)
        lines: list[str] = []
        report = await probe(shipped, target, 1, out=lines.append)
    assert report.failures == [], report.failures
    assert any(line.startswith("battery_1_capacity") for line in lines)


def test_essd_probe_exits_1_naming_the_register_against_essd_sim_with_a_wrong_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command pair, end to end: ``essd sim`` serves a Sungrow whose battery level is in
    0.01 % (not the profile's 0.1 %), ``essd probe`` with the shipped profile exits 1."""
    data = yaml.safe_load((shipped_profiles_dir() / "devices" / "sungrow-sh-rt.yaml").read_text())
    for reg in data["registers"]:
        if reg["name"] == "battery_level":
            reg["scale"] = 0.01
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "sungrow-sh-rt.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    site = tmp_path / "site.toml"
    site.write_text(
        f'profile_dirs = ["{variant}"]\n'
        '[site]\nid = "s"\ntimezone = "UTC"\ngrid_import_limit_w = 1e5\n'
        'grid_export_limit_w = 0\n[tariff]\ncurrency = "EUR"\nimport_price_per_kwh = 0.3\n'
        '[[devices]]\nid = "inv"\nprofile = "sungrow-sh-rt"\n'
        'transport = { kind = "tcp", host = "127.0.0.1", port = 15993, unit = 1 }\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "essd", "sim", "--site", str(site), "--free-ports"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "sim ended"
        url = line.split()[2]
        code = main(["probe", "--profile", "sungrow-sh-rt", "--transport", url, "--unit", "1"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAIL battery_level: 500 % outside [0, 100]" in err
    assert "sungrow-sh-rt at 127.0.0.1" in out
    assert "1 failed" in out
