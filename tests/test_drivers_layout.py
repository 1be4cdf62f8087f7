"""The register layout the simulator serves, and the ``essd profiles`` commands over it."""

from __future__ import annotations

import pytest

from drivers.layout import base_unit, from_base, to_base
from drivers.profile_loader import load_profile, load_profile_text, resolve_profile
from drivers.registers import EncodeError, Table
from essd.cli import main
from hil_sim.profile_image import ProfileImage
from hil_sim.store import ModbusExceptionCode, RegisterAccessError
from tests.support.devices import shipped_profile_paths

GAPPY = """
schema: 1
name: gappy
description: gaps
device_class: meter
source: test
transport: {read_gap_max: 3}
capabilities: [grid_meter]
registers:
  - {name: a, vendor_name: A, address: 10, type: s32, unit: kW, scale: 0.001}
  - {name: b, vendor_name: B, address: 14, type: u16, unit: "%", scale: 0.1, max: 100}
  - {name: c, vendor_name: C, address: 30, type: u16}
  - {name: d, vendor_name: D, address: 10, table: input, type: string, count: 3}
fields: {grid_power_w: a, share: b}
"""


def test_layout_defines_registers_and_allowed_gaps_only() -> None:
    image = ProfileImage(load_profile_text(GAPPY, "gappy.yaml"))
    assert image.defined(Table.HOLDING, 10, 5)  # a (2 words), gap 12..13, b
    assert not image.defined(Table.HOLDING, 15, 1)
    assert not image.defined(Table.HOLDING, 29, 1)  # the gap to c is too wide to read across
    assert image.defined(Table.HOLDING, 30, 1)
    assert image.defined(Table.INPUT, 10, 3)
    with pytest.raises(RegisterAccessError):
        image.read(Table.HOLDING, 14, 2)


def test_named_values_round_trip_in_register_and_base_units() -> None:
    image = ProfileImage(load_profile_text(GAPPY, "gappy.yaml"))
    image.set_value("a", -12.345)  # kW
    assert image.get_raw("a") == -12345
    assert image.get_field("grid_power_w") == pytest.approx(-12345.0)  # W
    image.set_field("share", 0.42)  # ratio -> 42.0 %
    assert image.get_raw("b") == 420
    assert image.value("b").value == pytest.approx(42.0)
    image.set_value("d", "SDM")
    assert image.value("d").value == "SDM"
    with pytest.raises(EncodeError, match=r"register b: 120 % outside"):
        image.set_value("b", 120.0)
    image.set_value("b", 120.0, check_range=False)  # a fault the simulator may inject
    assert not image.value("b").valid
    with pytest.raises(KeyError, match="no register 'zz'"):
        image.value("zz")
    with pytest.raises(KeyError, match="no field 'zz'"):
        image.get_field("zz")


def test_units_convert_to_base_and_back() -> None:
    assert base_unit("kW") == "W"
    assert base_unit("%") == "ratio"
    assert base_unit("V") == "V"
    assert to_base(1.5, "kWh") == 1500.0
    assert to_base(2, "min") == 120.0
    assert from_base(0.5, "%") == 50.0
    assert from_base(90.0, "min") == 1.5


PLAIN = [p.stem for p in shipped_profile_paths() if load_profile(p).driver == "generic"]


@pytest.mark.parametrize("name", PLAIN)
def test_every_shipped_plain_profile_lays_out(name: str) -> None:
    profile = resolve_profile(name)
    image = ProfileImage(profile)
    assert set(image.names()) == {r.name for r in profile.registers}


def test_cli_lists_the_shipped_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("household-hybrid-forcible", "household-ess-setpoint", "portable-power-station"):
        assert name in out
    assert "site-meter" in out
    assert main(["profiles", "show", "site-meter"]) == 0
    assert "Total system power" in capsys.readouterr().out


def test_clients_write_only_writable_registers_and_listeners_hear_them() -> None:
    profile = resolve_profile("household-hybrid-forcible")
    image = ProfileImage(profile)
    heard: list[tuple[str, ...]] = []
    image.add_write_listener(heard.append)
    spec = image.spec("forcible_charge_power")
    assert spec.address is not None
    image.write(spec.address, [0, 1500])
    assert heard == [("forcible_charge_power",)]
    assert image.get_value("forcible_charge_power") == 1500.0
    soc = image.spec("state_of_capacity")
    assert soc.address is not None
    with pytest.raises(RegisterAccessError) as info:
        image.write(soc.address, [500])  # read-only
    assert info.value.code == ModbusExceptionCode.ILLEGAL_DATA_ADDRESS
    with pytest.raises(RegisterAccessError):
        image.write(spec.address + 2, [0, 0, 0])  # runs past the register into nothing
    assert heard == [("forcible_charge_power",)]
    image.set_value("state_of_capacity", 55.5)  # the simulator itself may set anything
    assert image.get_field("soc") == pytest.approx(0.555)


def test_values_outside_the_register_type_are_refused() -> None:
    profile = load_profile_text(GAPPY, "gappy.yaml")
    image = ProfileImage(profile)
    with pytest.raises(EncodeError, match=r"register c: 70000: 70000 out of range for u16"):
        image.set_value("c", 70000)
    with pytest.raises(EncodeError, match="register c: -1"):
        image.set_value("c", -1)
    with pytest.raises(EncodeError, match="not a finite number"):
        image.set_value("c", float("nan"))
    with pytest.raises(EncodeError, match="does not fit 3 registers"):
        image.set_value("d", "TOO LONG")


def test_the_profile_readme_examples_are_valid_profiles() -> None:
    readme = (shipped_profile_paths()[0].parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    examples = [b for b in blocks if b.startswith("schema:")]
    names = []
    for example in examples:
        profile = load_profile_text(example, "README.md")
        ProfileImage(profile)
        names.append(profile.name)
    assert names == ["sungrow-sh-rt", "my-device"]
