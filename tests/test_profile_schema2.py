"""Profile schema 2: every new construct does what it says, and every bad input is refused by
``essd profiles show`` with exit 2 and a message naming the file and the field.

Constructs: enum and bit maps with severities, derivations (sum, product, sign from a bit,
selection), per-register word and byte order, the write function code, on-change writes with a
refresh period, checked units, battery stacks, and the version gate (schema 1 still loads).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.derive import add_derived, evaluate
from drivers.layout import classify_states, decode_register, encode_register, to_base
from drivers.profile import Profile, ProfileError
from drivers.profile_loader import load_profile_text
from drivers.profile_parts import Severity
from essd.cli import main
from essd.domain import Quality, Reading

BASE: dict[str, Any] = {
    "schema": 2,
    "name": "t",
    "description": "test",
    "device_class": "household",
    "source": "test",
    "capabilities": ["read_state", "active_power"],
    "ratings": {"capacity_wh": 10000, "max_charge_w": 5000, "max_discharge_w": 5000},
    "registers": [
        {"name": "soc", "vendor_name": "SOC", "address": 0, "unit": "%", "scale": 0.1,
         "min": 0, "max": 100},
        {"name": "power", "vendor_name": "P", "address": 1, "type": "s16", "unit": "W"},
        {"name": "state", "vendor_name": "State", "address": 2,
         "enum": {0: {"name": "Running"}, 3: {"name": "Fault", "severity": "fault"},
                  5: {"name": "Derating", "severity": "warning"}}},
        {"name": "alarms", "vendor_name": "Alarms", "address": 3,
         "bits": {0: {"name": "Over-temperature", "severity": "fault"},
                  4: {"name": "Fan", "severity": "warning"}, 6: {"name": "Info"}}},
        {"name": "setpoint", "vendor_name": "Set", "address": 10, "type": "s16", "unit": "W",
         "access": "rw", "min": -5000, "max": 5000},
        {"name": "energy", "vendor_name": "E", "address": 20, "type": "u32", "unit": "kWh",
         "scale": 0.1},
    ],
    "fields": {"soc": "soc", "power_w": "power", "state": "state", "alarms": "alarms",
               "energy_wh": "energy"},
    "actions": {"set_active_power": {"writes": [{"register": "setpoint", "param": "power_w"}]}},
}  # fmt: skip


def profile_of(**changes: Any) -> Profile:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return load_profile_text(yaml.safe_dump(data), "t.yaml")


def reg(p: Profile, name: str) -> Any:
    return p.register(name)


# -- constructs ------------------------------------------------------------------------------


def test_base_profile_loads() -> None:
    p = profile_of()
    assert p.schema_version == 2


def test_enum_values_map_to_their_severity() -> None:
    spec = reg(profile_of(), "state")
    assert [(f.name, f.severity) for f in classify_states(spec, 0, 1)] == [
        ("Running", Severity.INFO)
    ]
    assert classify_states(spec, 3, 1)[0].severity is Severity.FAULT
    assert classify_states(spec, 5, 1)[0].severity is Severity.WARNING
    unlisted = classify_states(spec, 9, 1)[0]
    assert unlisted.severity is Severity.WARNING  # the default for a value nobody documented
    assert unlisted.name == "unlisted value 9"


def test_unlisted_severity_can_be_fault() -> None:
    regs = copy.deepcopy(BASE["registers"])
    regs[2]["unlisted"] = "fault"
    spec = reg(profile_of(registers=regs), "state")
    assert classify_states(spec, 9, 1)[0].severity is Severity.FAULT


def test_bits_give_one_finding_per_set_bit() -> None:
    spec = reg(profile_of(), "alarms")
    found = classify_states(spec, 0b1101_0001, 1)
    assert [(f.name, f.severity) for f in found] == [
        ("Over-temperature", Severity.FAULT),
        ("Fan", Severity.WARNING),
        ("Info", Severity.INFO),
        ("unlisted bit 7", Severity.WARNING),
    ]
    assert classify_states(spec, 0, 1) == ()


def test_units_scale_to_base_units() -> None:
    p = profile_of()
    spec = reg(p, "energy")
    d = decode_register(spec, [0, 123], transport=p.transport)
    assert d.value == pytest.approx(12.3)  # kWh
    assert to_base(12.3, "kWh") == pytest.approx(12300.0)  # Wh


def test_per_register_word_order() -> None:
    regs = copy.deepcopy(BASE["registers"])
    regs[5]["word_order"] = "little"
    p = profile_of(registers=regs)
    spec = reg(p, "energy")
    assert p.transport.word_order.value == "big"
    # 0x0001_0002 raw, low word first on the wire
    assert decode_register(spec, [0x0002, 0x0001], transport=p.transport).raw == 0x0001_0002
    assert encode_register(spec, 6553.8, transport=p.transport) == [0x0002, 0x0001]


def test_per_register_byte_order() -> None:
    regs = copy.deepcopy(BASE["registers"])
    regs[1]["byte_order"] = "little"
    p = profile_of(registers=regs)
    assert decode_register(reg(p, "power"), [0x2C01], transport=p.transport).value == 300.0


def _r(v: float, unit: str = "W") -> Reading:
    return Reading.good(v, unit, 0.0)


def test_derived_product() -> None:
    p = profile_of(derived={"dc_w": {"product": ["soc", "power_w"], "scale": 2.0, "unit": "W"}})
    value, _ = evaluate(p.derived["dc_w"], {"soc": _r(0.5), "power_w": _r(100.0)}, {})
    assert value == pytest.approx(100.0)


def test_derived_sign_from_a_bit() -> None:
    p = profile_of(
        derived={
            "signed_w": {"magnitude": "power_w", "negative_when": {"field": "alarms", "bit": 4}}
        }
    )
    d = p.derived["signed_w"]
    values = {"power_w": _r(300.0)}
    assert evaluate(d, values, {"alarms": 1 << 4}) == (-300.0, "")
    assert evaluate(d, values, {"alarms": 0}) == (300.0, "")
    value, why = evaluate(d, values, {})
    assert value is None
    assert "alarms" in why


def test_derived_selection() -> None:
    p = profile_of(
        derived={
            "chosen_w": {
                "select": {"when": {"field": "state", "equals": 5}, "then": "power_w",
                           "otherwise": "soc"}
            }
        }
    )  # fmt: skip
    d = p.derived["chosen_w"]
    values = {"power_w": _r(300.0), "soc": _r(0.4, "ratio")}
    assert evaluate(d, values, {"state": 5}) == (300.0, "")
    assert evaluate(d, values, {"state": 0}) == (0.4, "")


def test_schema_1_sum_still_loads() -> None:
    p = profile_of(schema=1, derived={"net_w": {"power_w": 1.0, "soc": -1.0}},
                   registers=[{k: v for k, v in r.items() if k not in ("enum", "bits")}
                              for r in BASE["registers"]])  # fmt: skip
    assert p.derived["net_w"].sum == {"power_w": 1.0, "soc": -1.0}


def test_battery_stacks_aggregate() -> None:
    regs = copy.deepcopy(BASE["registers"])
    regs.append({"name": "soc2", "vendor_name": "SOC2", "address": 30, "unit": "%"})
    regs.append({"name": "p2", "vendor_name": "P2", "address": 31, "type": "s16", "unit": "W"})
    fields = {"soc_1": "soc", "soc_2": "soc2", "p_1": "power", "p_2": "p2"}
    p = profile_of(
        registers=regs,
        fields=fields,
        ratings={"capacity_wh": 15000, "max_charge_w": 5000, "max_discharge_w": 5000},
        batteries=[
            {"id": "a", "capacity_wh": 10000, "soc": "soc_1", "power_w": "p_1"},
            {"id": "b", "capacity_wh": 5000, "soc": "soc_2", "power_w": "p_2"},
        ],
    )
    out = {
        "soc_1": _r(0.9, "ratio"),
        "soc_2": _r(0.3, "ratio"),
        "p_1": _r(1000.0),
        "p_2": _r(-200.0),
    }
    add_derived(p, out, 1.0)
    assert out["soc"].value == pytest.approx((0.9 * 10 + 0.3 * 5) / 15)
    assert out["power_w"].value == pytest.approx(800.0)
    out["soc_2"] = Reading.bad("ratio", 1.0, Quality.INVALID, "x")
    del out["soc"]
    add_derived(p, out, 1.0)
    assert not out["soc"].valid
    assert "b" in out["soc"].reason


def test_divide_by_a_live_voltage_writes_a_current() -> None:
    regs = copy.deepcopy(BASE["registers"])
    regs[4].update(unit="A", min=0, max=200, type="u16")
    regs.append({"name": "volts", "vendor_name": "V", "address": 30, "unit": "V", "scale": 0.1})
    p = profile_of(
        registers=regs,
        fields={**BASE["fields"], "bus_v": "volts"},
        capabilities=["read_state", "charge_limit"],
        actions={
            "set_charge_limit": {
                "writes": [{"register": "setpoint", "param": "charge_w", "divide_by": "bus_v"}]
            }
        },
    )
    step = p.actions[next(iter(p.actions))].writes[0]
    assert step.divide_by == "bus_v"


def test_write_function_code_and_on_change() -> None:
    p = profile_of(
        behaviour={"setpoint_timeout_s": 60},
        actions={
            "set_active_power": {
                "write": "on_change",
                "refresh_s": 20,
                "writes": [{"register": "setpoint", "param": "power_w", "function": 16}],
            }
        },
    )
    act = p.actions[next(iter(p.actions))]
    assert act.write == "on_change"
    assert act.refresh_s == 20
    assert act.writes[0].function == 16


# -- bad input: exit 2, naming file and field -------------------------------------------------

BAD: dict[str, tuple[dict[str, Any], str]] = {}


def _regs(i: int, **change: Any) -> list[dict[str, Any]]:
    regs = copy.deepcopy(BASE["registers"])
    regs[i].update(change)
    return regs


BAD = {
    "unknown unit": ({"registers": _regs(1, unit="kw")}, "registers.1: unit: unknown unit 'kw'"),
    "enum key not a number": (
        {"registers": _regs(2, enum={"running": {"name": "x"}})},
        "registers.2.enum.running",
    ),
    "enum value outside the type": (
        {"registers": _regs(2, enum={70000: {"name": "x"}})},
        "registers.2: enum.70000: value outside u16 0..65535",
    ),
    "enum severity unknown": (
        {"registers": _regs(2, enum={1: {"name": "x", "severity": "critical"}})},
        "registers.2.enum.1.severity",
    ),
    "enum name twice": (
        {"registers": _regs(2, enum={1: {"name": "x"}, 2: {"name": "x"}})},
        "registers.2: enum.2: name 'x' already given to 1",
    ),
    "enum on a float": (
        {"registers": _regs(2, type="f32")},
        "registers.2: enum: needs an integer register, not f32",
    ),
    "bit outside the register": (
        {"registers": _regs(3, bits={16: {"name": "x"}})},
        "registers.3: bits.16: bit outside 0..15",
    ),
    "overlapping registers": (
        {"registers": _regs(5, address=2)},
        "registers.energy.address: holding 2..3 overlaps register",
    ),
    "function 6 on two words": (
        {
            "registers": _regs(4, type="s32"),
            "actions": {
                "set_active_power": {
                    "writes": [{"register": "setpoint", "param": "power_w", "function": 6}]
                }
            },
        },
        "actions.set_active_power.writes.0.function: function 6 writes one register",
    ),
    "function code unknown": (
        {
            "actions": {
                "set_active_power": {
                    "writes": [{"register": "setpoint", "param": "power_w", "function": 5}]
                }
            }
        },
        "actions.set_active_power.writes.0.function",
    ),
    "on_change without refresh": (
        {
            "actions": {
                "set_active_power": {
                    "write": "on_change",
                    "writes": [{"register": "setpoint", "param": "power_w"}],
                }
            }
        },
        "actions.set_active_power: refresh_s: required with write: on_change",
    ),
    "refresh slower than the device's timeout": (
        {
            "behaviour": {"setpoint_timeout_s": 60},
            "actions": {
                "set_active_power": {
                    "write": "on_change",
                    "refresh_s": 50,
                    "writes": [{"register": "setpoint", "param": "power_w"}],
                }
            },
        },
        "actions.set_active_power.refresh_s: 50 s",
    ),
    "derived from an unknown field": (
        {"derived": {"x_w": {"product": ["soc", "nope"], "unit": "W"}}},
        "derived.x_w.nope: no field named 'nope'",
    ),
    "product without unit": (
        {"derived": {"x_w": {"product": ["soc", "power_w"]}}},
        "derived.x_w: unit: a product must name its unit",
    ),
    "derived unit not a base unit": (
        {"derived": {"x_w": {"product": ["soc", "power_w"], "unit": "kW"}}},
        "derived.x_w.unit: 'kW' is not a base unit",
    ),
    "condition on a derived field": (
        {
            "derived": {
                "a_w": {"sum": {"power_w": 1.0}},
                "b_w": {"magnitude": "power_w", "negative_when": {"field": "a_w", "bit": 1}},
            }
        },
        "derived.b_w: condition on 'a_w', which is not a field mapped to a register",
    ),
    "stack with an unknown field": (
        {"batteries": [{"id": "a", "capacity_wh": 10000, "soc": "soc", "power_w": "nope"}]},
        "batteries.0.power_w: no field named 'nope'",
    ),
    "stacks that do not add up": (
        {"batteries": [{"id": "a", "capacity_wh": 4000, "soc": "soc", "power_w": "power_w"}]},
        "batteries: the stacks hold 4000 Wh, ratings.capacity_wh says 10000 Wh",
    ),
    "a power written to a current register": (
        {"registers": _regs(4, unit="A")},
        "actions.set_active_power.writes.0.param: power_w is a power in W, but register "
        "setpoint holds A",
    ),
    "divide by a field that is not a voltage or power": (
        {
            "registers": _regs(4, unit="A"),
            "actions": {
                "set_active_power": {
                    "writes": [{"register": "setpoint", "param": "power_w", "divide_by": "state"}]
                }
            },
        },
        "actions.set_active_power.writes.0.divide_by: state must be in V (giving A) or W",
    ),
    "divide by no field": (
        {
            "registers": _regs(4, unit="A"),
            "actions": {
                "set_active_power": {
                    "writes": [{"register": "setpoint", "param": "power_w", "divide_by": "nope"}]
                }
            },
        },
        "actions.set_active_power.writes.0.divide_by: 'nope' is not a field",
    ),
    "divided power into a power register": (
        {
            "registers": [
                *BASE["registers"],
                {"name": "volts", "vendor_name": "V", "address": 30, "unit": "V"},
            ],
            "fields": {**BASE["fields"], "bus_v": "volts"},
            "actions": {
                "set_active_power": {
                    "writes": [{"register": "setpoint", "param": "power_w", "divide_by": "bus_v"}]
                }
            },
        },
        "power_w is a power in W per bus_v (A), but register setpoint holds W",
    ),
    "schema 1 with an enum": ({"schema": 1}, "registers.state.enum: needs schema: 2"),
    "unknown schema version": ({"schema": 3}, "schema"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_profile_exits_2_naming_file_and_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes, expected = BAD[case]
    data = copy.deepcopy(BASE)
    data.update(changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError):
        load_profile_text(path.read_text(), str(path))
    code = main(["profiles", "show", "t", "--profile-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err
    assert expected in err, err
