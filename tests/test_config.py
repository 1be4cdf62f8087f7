"""Configuration: valid files load, every kind of bad input names its field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from essd.cli import main
from essd.config import Settings
from essd.config_loading import ConfigError, load_settings

EXAMPLE = Path(__file__).parents[1] / "profiles" / "sites" / "example.toml"

MINIMAL = """
[site]
id = "home-1"
timezone = "Europe/Berlin"
grid_import_limit_w = 9000
grid_export_limit_w = 5000

[tariff]
currency = "EUR"
import_price_per_kwh = 0.52

[[devices]]
id = "inv1"
profile = "household-hybrid-forcible"
transport = { kind = "tcp", host = "192.0.2.10", port = 502, unit = 1 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "essd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path | None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.site.id == "home-1"
    assert s.site.grid_export_limit_w == 5000
    assert s.devices[0].transport.kind == "tcp"
    assert s.control.cycle_period_s == 10.0
    assert s.metrics.bind == "127.0.0.1"
    assert s.mqtt is None


def test_example_site_loads() -> None:
    s = load_settings(EXAMPLE)
    assert [d.id for d in s.devices] == ["pcs1", "home-a", "home-b", "camp1", "meter"]
    assert s.site.grid_export_limit_w == 0
    assert len(s.tariff.import_tou) == 7


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[control]\ncycle_perod_s = 5\n")
    assert problems_of(path) == [
        f"{path}: control.cycle_perod_s: unknown key; did you mean 'cycle_period_s'?"
    ]


def test_an_unknown_key_far_from_any_known_one_gets_no_guess(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[control]\nbanana = 5\n")
    assert problems_of(path) == [f"{path}: control.banana: unknown key"]


def test_did_you_mean_looks_in_the_right_section_also_inside_lists(tmp_path: Path) -> None:
    text = MINIMAL.replace('profile = "household', 'reserv_soc = 0.2\nprofile = "household')
    text = text.replace("[site]", '[sit]\nid = "x"\n\n[site]')
    problems = problems_of(write(tmp_path, text))
    assert any(
        p.endswith("devices.0.reserv_soc: unknown key; did you mean 'reserve_soc'?")
        for p in problems
    )
    assert any(p.endswith("sit: unknown key; did you mean 'site'?") for p in problems)


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        ("reserve_soc = 15", "a ratio 0..1; did you mean 0.15?"),
        ("max_soc = 95", "a ratio 0..1; did you mean 0.95?"),
        ("reserve_soc = 150", "a ratio 0..1"),
        ("reserve_soc = -0.1", "a ratio 0..1"),
    ],
)
def test_a_ratio_given_as_a_percentage_gets_a_unit_hint(
    tmp_path: Path, line: str, hint: str
) -> None:
    path = write(tmp_path, MINIMAL + f"\n[control]\n{line}\n")
    (problem,) = problems_of(path)
    field = line.split(" ", maxsplit=1)[0]
    assert problem.startswith(f"{path}: control.{field}: ")
    assert problem.endswith(hint)
    if "did you mean" not in hint:
        assert "did you mean" not in problem


@pytest.mark.parametrize(
    ("drop", "field"),
    [('timezone = "Europe/Berlin"\n', "site.timezone"), ('currency = "EUR"\n', "tariff.currency")],
)
def test_timezone_and_currency_are_required(tmp_path: Path, drop: str, field: str) -> None:
    path = write(tmp_path, MINIMAL.replace(drop, ""))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: {field}: required (")


def test_a_currency_must_be_an_iso_code(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('currency = "EUR"', 'currency = "euro"'))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: tariff.currency: ")


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[batteries]\nx = 1\n")
    assert problems_of(path) == [f"{path}: batteries: unknown key"]


def test_negative_limit_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path, MINIMAL.replace("grid_import_limit_w = 9000", "grid_import_limit_w = -1")
    )
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: site.grid_import_limit_w: ")
    assert "greater than or equal to 0" in line


def test_port_out_of_range_is_named_with_its_device_index(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("port = 502", "port = 70000"))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: devices.0.transport.port: ")
    assert "65535" in line


def test_wrong_type_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '\n[control]\ncycle_period_s = "fast"\n')
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: control.cycle_period_s: ")
    assert "number" in line


def test_cycle_period_outside_1_to_900_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[control]\ncycle_period_s = 901\n")
    assert problems_of(path)[0].startswith(f"{path}: control.cycle_period_s: ")


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    text = MINIMAL.replace("port = 502", "port = 0").replace('id = "home-1"', 'id = "Home 1"')
    lines = problems_of(write(tmp_path, text))
    assert len(lines) == 2
    assert any("site.id" in ln for ln in lines)
    assert any("devices.0.transport.port" in ln for ln in lines)


def test_missing_file_is_an_error_not_an_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert problems_of(path) == [f"{path}: configuration file not found"]


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[site]\nid = \n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: not valid TOML")
    assert "line 2" in line


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESSD_CONTROL__CYCLE_PERIOD_S", "5")
    monkeypatch.setenv("ESSD_SITE__GRID_EXPORT_LIMIT_W", "0")
    s = load_settings(write(tmp_path, MINIMAL + "\n[control]\ncycle_period_s = 30\n"))
    assert s.control.cycle_period_s == 5.0
    assert s.site.grid_export_limit_w == 0.0
    assert s.site.grid_import_limit_w == 9000.0


def test_bad_environment_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESSD_CONTROL__CYCLE_PERIOD_S", "soon")
    (line,) = problems_of(write(tmp_path, MINIMAL))
    assert line.startswith("environment ESSD_CONTROL__CYCLE_PERIOD_S: control.cycle_period_s: ")


def test_mqtt_section_from_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESSD_MQTT__HOST", "127.0.0.1")
    monkeypatch.setenv("ESSD_MQTT__PORT", "1884")
    s = Settings(
        site={"id": "s", "timezone": "UTC", "grid_import_limit_w": 1, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
    )
    assert s.mqtt is not None
    assert (s.mqtt.host, s.mqtt.port) == ("127.0.0.1", 1884)


def test_cross_field_rules(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[control]\nreserve_soc = 0.9\nmax_soc = 0.8\n")
    assert problems_of(path) == [f"{path}: control: reserve_soc: must be below max_soc"]
    path = write(tmp_path, MINIMAL + "\n[control]\ncycle_period_s = 60\nsetpoint_ttl_s = 90\n")
    assert "setpoint_ttl_s: must be at least twice cycle_period_s" in problems_of(path)[0]


def test_tariff_needs_exactly_one_import_price(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "import_price_per_kwh = 0.52",
        'import_price_per_kwh = 0.52\n[[tariff.import_tou]]\nstart = "00:00:00"\nprice_per_kwh = 1',
    )
    assert "import_price_per_kwh: give either" in problems_of(write(tmp_path, text))[0]


def test_duplicate_device_ids(tmp_path: Path) -> None:
    dev = MINIMAL[MINIMAL.index("[[devices]]") :]
    assert "devices: duplicate id(s) inv1" in problems_of(write(tmp_path, MINIMAL + dev))[0]


def test_unknown_time_zone(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('timezone = "Europe/Berlin"', 'timezone = "Mars/Base"'))
    assert problems_of(path) == [f"{path}: site.timezone: unknown time zone 'Mars/Base'"]


def test_check_config_cli_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = write(tmp_path, MINIMAL.replace("port = 502", "port = -3"))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: devices.0.transport.port:" in err
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "configuration file not found" in capsys.readouterr().err


def test_check_config_reports_unknown_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL.replace("household-hybrid-forcible", "no-such-device"))
    assert main(["check-config", str(path)]) == 2
    assert (
        f"{path}: devices.0.profile: profile 'no-such-device' not found" in capsys.readouterr().err
    )


def test_check_config_warns_when_the_cycle_cannot_keep_a_device_refreshed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The ESS-style inverter drops its setpoint after 60 s without a refresh.
    text = MINIMAL.replace("household-hybrid-forcible", "household-ess-setpoint")
    path = write(tmp_path, text + "\n[control]\ncycle_period_s = 45\nsetpoint_ttl_s = 120\n")
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert (
        f"{path}: warning: devices.0: device inv1 (household-ess-setpoint) drops a setpoint" in err
    )
    assert "control.cycle_period_s is 45 s: use 30 s or less" in err
    path = write(tmp_path, text + "\n[control]\ncycle_period_s = 10\n")
    assert main(["check-config", str(path)]) == 0
    assert "drops a setpoint" not in capsys.readouterr().err


def test_the_demand_window_divides_the_hour_and_defaults_to_the_step(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[tariff]", "[tariff]\ndemand_window_s = 700"))
    assert "demand_window_s: must divide the hour" in problems_of(path)[0]
    settings = load_settings(write(tmp_path, MINIMAL + "\n[control]\nstep_s = 1800\n"))
    assert settings.demand_window_s == 1800.0
    text = MINIMAL.replace("[tariff]", "[tariff]\ndemand_window_s = 900")
    settings = load_settings(write(tmp_path, text + "\n[control]\nstep_s = 1800\n"))
    assert settings.demand_window_s == 900.0


def test_planning_the_window_under_way_needs_the_window_to_be_the_step(tmp_path: Path) -> None:
    text = MINIMAL.replace("[tariff]", "[tariff]\ndemand_window_s = 900")
    path = write(tmp_path, text + "\n[control]\nstep_s = 1800\nplan_billing_window = true\n")
    assert "tariff.demand_window_s must equal control.step_s" in problems_of(path)[0]
