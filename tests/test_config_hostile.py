"""Hostile input: each bad config or profile is refused by `check-config` and by `run` alike.

Both commands go through one check (`essd.sitecheck.validate_site`), exit 2 and print one line
naming the file and the dotted field. Nothing here starts a daemon: a refused file stops `run`
before any device is touched.
"""

from __future__ import annotations

import copy
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers import profile_loader as profile_module
from drivers.factory import EndpointPool
from drivers.layout import write_scale_problem
from drivers.profile import ProfileError
from drivers.profile_loader import load_profile, resolve_profile
from essd.cli import main
from essd.clock import SimClock
from essd.config import MAX_CONFIG_BYTES
from essd.config_loading import load_settings
from essd.daemon import build_controller
from essd.events import EventBus

HEAD = """
[site]
id = "s1"
timezone = "Asia/Shanghai"
grid_import_limit_w = 9000
grid_export_limit_w = 5000

[tariff]
currency = "CNY"
import_price_per_kwh = 0.5
"""

INVERTER = """
[[devices]]
id = "inv1"
profile = "{profile}"
transport = {{ kind = "tcp", host = "192.0.2.10", port = 502, unit = 1 }}
{extra}
"""

METER = """
[[devices]]
id = "{id}"
profile = "site-meter"
transport = {{ kind = "tcp", host = "192.0.2.20", port = 502, unit = {unit} }}
"""


def site(
    tmp_path: Path,
    *,
    head_extra: str = "",
    device_extra: str = "",
    profile: str = "household-hybrid-forcible",
    tail: str = "",
    meters: int = 1,
) -> Path:
    """A config with one inverter, ``meters`` meters, and the given additions."""
    text = textwrap.dedent(HEAD) + head_extra
    if profile != "household-hybrid-forcible":
        text = f'profile_dirs = ["{tmp_path / "profiles"}"]\n' + text
    text += INVERTER.format(profile=profile, extra=device_extra)
    for n in range(meters):
        text += METER.format(id=f"meter{n}", unit=n + 1)
    path = tmp_path / "essd.toml"
    path.write_text(text + tail, encoding="utf-8")
    return path


def base_profile() -> dict[str, Any]:
    """The hybrid inverter profile as plain data (no shared nodes, so no YAML aliases)."""
    dumped = resolve_profile("household-hybrid-forcible").model_dump(mode="json", by_alias=True)
    return json.loads(json.dumps(dumped))  # type: ignore[no-any-return]


def write_profile(tmp_path: Path, data: dict[str, Any], name: str = "hostile") -> Path:
    """Write ``data`` as profile ``name`` under tmp_path/profiles."""
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "name": name}, sort_keys=False), encoding="utf-8")
    return path


def register(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The register called ``name`` in profile data."""
    (reg,) = [r for r in data["registers"] if r["name"] == name]
    return reg  # type: ignore[no-any-return]


def refused_by_both(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run check-config and run on ``path``: both exit 2 with the same message; return it."""
    assert main(["check-config", str(path)]) == 2
    checked = capsys.readouterr()
    assert main(["run", "--config", str(path)]) == 2
    ran = capsys.readouterr()
    assert checked.err == ran.err
    assert checked.err.strip(), "no message"
    assert "Traceback" not in checked.err
    return checked.err


# --- the configuration file --------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "device reserve above its own max",
        {"device_extra": "reserve_soc = 0.8\nmax_soc = 0.7"},
        "devices.0.reserve_soc: empty SoC window",
    ),
    (
        "device reserve above control.max_soc",
        {"device_extra": "reserve_soc = 0.96"},
        "devices.0.reserve_soc: empty SoC window",
    ),
    (
        "device max below control.reserve_soc",
        {"device_extra": "max_soc = 0.05"},
        "devices.0.max_soc: empty SoC window",
    ),
    ("capacity inf", {"device_extra": "capacity_wh = inf"}, "devices.0.capacity_wh:"),
    (
        "device degradation cost inf",
        {"device_extra": "degradation_cost_per_kwh = inf"},
        "devices.0.degradation_cost_per_kwh:",
    ),
    (
        "control degradation cost inf",
        {"tail": "\n[control]\ndegradation_cost_per_kwh = inf\n"},
        "control.degradation_cost_per_kwh:",
    ),
    (
        "churn penalty inf",
        {"tail": "\n[control]\nchurn_penalty_per_kw = inf\n"},
        "control.churn_penalty_per_kw:",
    ),
    (
        "churn penalty nan",
        {"tail": "\n[control]\nchurn_penalty_per_kw = nan\n"},
        "control.churn_penalty_per_kw:",
    ),
    (
        "missing series file",
        {"tail": '\n[forecast]\nload = "file"\nseries_file = "/nonexistent/series.csv"\n'},
        "forecast.series_file: /nonexistent/series.csv: cannot read",
    ),
    (
        "carbon intensity inf",
        {"tail": "\n[forecast]\ncarbon_intensity_g_per_kwh = inf\n"},
        "forecast.carbon_intensity_g_per_kwh:",
    ),
    (
        "carbon price inf",
        {"head_extra": "carbon_price_per_kg = inf\n"},
        "tariff.carbon_price_per_kg:",
    ),
    (
        "demand charge inf",
        {"head_extra": "demand_charge_per_kw = inf\n"},
        "tariff.demand_charge_per_kw:",
    ),
    (
        "metrics bind not an address",
        {"tail": '\n[metrics]\nbind = "not an address!"\n'},
        "metrics.bind: 'not an address!' is neither an IP address nor a host name",
    ),
    (
        "two devices on one host:port:unit",
        {"tail": METER.format(id="inv2", unit=1).replace("site-meter", "household-ess-setpoint")},
        "devices.2.transport: 192.0.2.20:502 unit 1 is already devices.1 (meter0)",
    ),
    ("two meters", {"meters": 2}, "devices.2.profile: a second grid meter (devices.1, meter0"),
]


@pytest.mark.parametrize(
    ("case", "changes", "expected"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_is_refused_by_check_config_and_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    changes: dict[str, Any],
    expected: str,
) -> None:
    path = site(tmp_path, **changes)
    err = refused_by_both(path, capsys)
    assert f"{path}: {expected}" in err, err


def test_two_devices_on_one_serial_unit_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serial = """
[[devices]]
id = "camp{n}"
profile = "portable-power-station"
transport = {{ kind = "serial", port = "/dev/ttyUSB0", unit = 3 }}
"""
    path = site(tmp_path, tail=serial.format(n=1) + serial.format(n=2))
    err = refused_by_both(path, capsys)
    assert (
        f"{path}: devices.3.transport: serial port /dev/ttyUSB0 unit 3 is already devices.2" in err
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01\x02TOML?\xff\xfe", "is binary, not text"),
        ('[site]\nname = "caf\xe9"\n'.encode("latin-1"), "is not UTF-8 text"),
        (b"# " + b"x" * MAX_CONFIG_BYTES + b"\n", "more than the 262144 allowed"),
    ],
    ids=["binary", "latin-1", "oversized"],
)
def test_unreadable_config_file_is_refused_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "essd.toml"
    path.write_bytes(content)
    err = refused_by_both(path, capsys)
    assert err.startswith(f"{path}: configuration file "), err
    assert message in err


# --- profiles ----------------------------------------------------------------------------------


def _profile_case(case: str) -> dict[str, Any]:
    data = base_profile()
    if case == "capacity 0":
        data["ratings"]["capacity_wh"] = 0
    elif case == "rating inf":
        data["ratings"]["max_charge_w"] = float("inf")
    elif case == "scale nan":
        register(data, "state_of_capacity")["scale"] = float("nan")
    elif case == "max inf":
        register(data, "charge_discharge_power")["max"] = float("inf")
    elif case == "overlapping registers":
        register(data, "state_of_capacity")["address"] = 37759  # inside rated_capacity (u32)
    elif case == "safe mode out of range":
        data["actions"]["safe_mode"]["writes"][0]["value"] = 7  # register max is 2
    elif case == "safe mode not representable":
        register(data, "forcible_charge_discharge")["max"] = 100_000
        data["actions"]["safe_mode"]["writes"][0]["value"] = 70_000  # > u16
    elif case == "write scale cannot carry the rating":
        # 1 raw = 1 MW: every setpoint of a 5 kW unit encodes to raw 0.
        register(data, "forcible_charge_power")["scale"] = 1e6
    return data


PROFILE_CASES = [
    ("capacity 0", "devices.0.capacity_wh: profile hostile rates no capacity"),
    ("rating inf", "ratings.max_charge_w: Input should be a finite number"),
    ("scale nan", "registers.1.scale: Input should be a finite number"),
    ("max inf", "registers.3.max: Input should be a finite number"),
    (
        "overlapping registers",
        "registers.state_of_capacity.address: holding 37759..37759 overlaps register "
        "rated_capacity (holding 37758..37759)",
    ),
    (
        "safe mode out of range",
        "actions.safe_mode.writes.0.value: 7 outside register forcible_charge_discharge's range",
    ),
    ("safe mode not representable", "actions.safe_mode.writes.0.value: register"),
    (
        "write scale cannot carry the rating",
        "registers.forcible_charge_power.scale: one raw step is 1e+06 W, coarser than 1% of "
        "the rating 5000 W",
    ),
]


@pytest.mark.parametrize(("case", "expected"), PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_bad_profile_is_refused_by_check_config_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    profile_path = write_profile(tmp_path, _profile_case(case))
    path = site(tmp_path, profile="hostile")
    err = refused_by_both(path, capsys)
    assert expected in err, err
    if case != "capacity 0":  # a profile's own error names the profile file
        assert f"{path}: devices.0.profile: {profile_path}: " in err, err
    else:  # the profile may be fine: the site must then give the capacity
        given = site(tmp_path, profile="hostile", device_extra="capacity_wh = 5000")
        assert main(["check-config", str(given)]) == 0


def _alias_bomb(levels: int = 9) -> str:
    """Billion laughs: expanded, ``levels`` levels of 10 references need 10**levels strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, levels + 1):
        refs = ",".join([f"*a{n - 1}"] * 10)
        lines.append(f"a{n}: &a{n} [{refs}]")
    return "\n".join(lines)


def test_alias_bomb_in_a_profile_is_refused_without_expanding_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10**9 strings of 3 bytes: more than 1 GB if ever expanded.
    text = yaml.safe_dump({**base_profile(), "name": "hostile"}, sort_keys=False)
    text = text.replace("capabilities:", _alias_bomb() + "\ncapabilities:", 1)
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "hostile.yaml").write_text(text, encoding="utf-8")
    # The loader never builds an alias: constructing any sequence of the bomb would be work.
    built: list[int] = []
    original = yaml.SafeLoader.construct_sequence

    def counting(self: yaml.SafeLoader, node: Any, deep: bool = False) -> list[Any]:
        built.append(len(node.value))
        return original(self, node, deep)

    monkeypatch.setattr(yaml.SafeLoader, "construct_sequence", counting)
    path = site(tmp_path, profile="hostile")
    err = refused_by_both(path, capsys)
    assert "anchors and aliases" in err
    assert "hostile.yaml: line " in err
    assert built == []  # refused while composing, before anything was constructed


def test_oversized_or_binary_profile_is_refused_before_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    profile = folder / "hostile.yaml"
    profile.write_bytes(b"# " + b"x" * (profile_module.MAX_PROFILE_BYTES + 1) + b"\n")

    def no_parsing(*_: object, **__: object) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(yaml, "load", no_parsing)
    path = site(tmp_path, profile="hostile")
    assert "more than the 1048576 allowed" in refused_by_both(path, capsys)
    profile.write_bytes(b"schema: 1\nname: \xff\xfe\n")
    assert "is not UTF-8 text" in refused_by_both(path, capsys)
    profile.write_bytes(b"schema: 1\x00\x00")
    assert "is binary, not text" in refused_by_both(path, capsys)


def test_each_profile_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(tmp_path, base_profile(), name="once")
    calls: list[str] = []
    original = profile_module.load_profile_text

    def counting(text: str, source: str) -> Any:
        calls.append(source)
        return original(text, source)

    monkeypatch.setattr(profile_module, "load_profile_text", counting)
    path = site(tmp_path, profile="once")
    settings = load_settings(path)
    assert main(["check-config", str(path)]) == 0
    clock = SimClock(0.0)
    build_controller(settings, clock=clock, bus=EventBus(), pool=EndpointPool(clock=clock))
    assert resolve_profile("once", settings.profile_dirs) is resolve_profile(
        "once", settings.profile_dirs
    )
    assert [Path(c).name for c in calls] == ["once.yaml"]


def test_a_changed_profile_is_read_again(tmp_path: Path) -> None:
    path = write_profile(tmp_path, base_profile(), name="edited")
    first = load_profile(path)
    data = copy.deepcopy(base_profile())
    data["description"] = "edited in place, and longer than before"
    write_profile(tmp_path, data, name="edited")
    assert load_profile(path).description != first.description


def test_a_device_scale_factor_that_cannot_carry_the_rating_is_refused() -> None:
    pcs = base_profile()
    spec = register(pcs, "forcible_charge_power")
    spec["scale_factor"] = "rated_capacity"  # any register will do as the SF source here
    profile = profile_module.Profile.model_validate(pcs)
    reg = profile.register("forcible_charge_power")
    assert write_scale_problem(reg, [5000.0], transport=profile.transport, sf=0) is None
    assert "outside -10..10" in str(
        write_scale_problem(reg, [5000.0], transport=profile.transport, sf=15)
    )
    assert "coarser than 1%" in str(
        write_scale_problem(reg, [5000.0], transport=profile.transport, sf=3)
    )


def test_profile_error_names_the_file_and_field_directly(tmp_path: Path) -> None:
    path = write_profile(tmp_path, _profile_case("overlapping registers"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: registers.state_of_capacity.address: ")


# --- warnings ----------------------------------------------------------------------------------

PORTABLE = """
[[devices]]
id = "camp1"
profile = "portable-power-station"
transport = { kind = "rtu-over-tcp", host = "192.0.2.30", port = 502, unit = 1 }
"""


def test_forced_device_without_revert_is_warned_by_check_config_and_logged_once_by_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = site(tmp_path, tail=PORTABLE)
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    want = (
        f"{path}: warning: devices.2: device camp1 (portable-power-station) has neither a "
        "revert timer nor a heartbeat: it stays in forced charge/discharge if essd dies"
    )
    assert want in err
    assert err.count("revert timer") == 1  # the hybrid inverter has its own revert
    clock = SimClock(0.0)
    with caplog.at_level(logging.WARNING, logger="essd.daemon"):
        build_controller(
            load_settings(path), clock=clock, bus=EventBus(), pool=EndpointPool(clock=clock)
        )
    logged = [r.getMessage() for r in caplog.records if "revert timer" in r.getMessage()]
    assert len(logged) == 1
    assert "device camp1" in logged[0]


def test_no_meter_is_a_warning_that_every_battery_idles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = site(tmp_path, meters=0)
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}: warning: devices: no grid meter" in err
    assert "every battery idles" in err
