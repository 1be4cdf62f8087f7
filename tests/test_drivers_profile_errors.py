"""A malformed profile is refused with an error naming the file and the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from drivers.profile import ProfileError
from drivers.profile_loader import load_profile, resolve_profile
from hil_sim.profile_image import ProfileImage

BASE = resolve_profile("household-hybrid-forcible").model_dump(mode="json", by_alias=True)


def _write(tmp_path: Path, data: dict[str, object], name: str = "broken") -> Path:
    data = {**data, "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _register(data: dict[str, object], name: str) -> dict[str, object]:
    regs = data["registers"]
    assert isinstance(regs, list)
    for r in regs:
        if r["name"] == name:
            return r  # type: ignore[no-any-return]
    raise KeyError(name)


def _mutate(mutation: str) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load(yaml.safe_dump(BASE))
    if mutation == "bad-type":
        _register(data, "state_of_capacity")["type"] = "u24"
    elif mutation == "no-vendor-name":
        del _register(data, "state_of_capacity")["vendor_name"]
    elif mutation == "address-and-point":
        _register(data, "state_of_capacity")["point"] = "802.SoC"
    elif mutation == "unknown-field-register":
        data["fields"] = {**data["fields"], "soc": "no_such_register"}  # type: ignore[dict-item]
    elif mutation == "param-not-allowed":
        data["actions"]["set_charge_limit"]["writes"][0]["param"] = "power_w"  # type: ignore[index]
    elif mutation == "read-only-target":
        data["actions"]["safe_mode"]["writes"][0]["register"] = "running_status"  # type: ignore[index]
    elif mutation == "when-outside-power":
        data["actions"]["safe_mode"]["writes"][0]["when"] = "charge"  # type: ignore[index]
    elif mutation == "capability-without-action":
        data["capabilities"] = [*data["capabilities"], "heartbeat"]  # type: ignore[list-item]
    elif mutation == "unknown-key":
        _register(data, "state_of_capacity")["gain"] = 10
    elif mutation == "min-above-max":
        _register(data, "state_of_capacity")["min"] = 200
    elif mutation == "duplicate-register":
        regs = data["registers"]
        assert isinstance(regs, list)
        regs.append(copy.deepcopy(regs[0]))  # no shared nodes: no YAML alias
    elif mutation == "derived-unknown-term":
        data["derived"] = {"net_w": {"nope": 1.0}}
    elif mutation == "power-without-idle":
        writes = data["actions"]["set_active_power"]["writes"]  # type: ignore[index]
        data["actions"]["set_active_power"]["writes"] = [  # type: ignore[index]
            w for w in writes if w.get("when") != "idle"
        ]
    elif mutation.startswith("sim-"):
        behaviour = data["simulation"]["behaviour"]  # type: ignore[index]
        if mutation == "sim-status-register":
            behaviour["status"]["register"] = "nope"
        elif mutation == "sim-gate-register":
            behaviour["gates"] = [{"register": "nope", "no_charge": [1]}]
        elif mutation == "sim-sunspec-on-plain":
            behaviour["model"] = "sunspec"
        elif mutation == "sim-unknown-model":
            behaviour["model"] = "victron"
        elif mutation == "sim-power-through":
            behaviour["power_through"] = "soc"
    elif mutation == "gap-out-of-range":
        data["transport"]["read_gap_max"] = 500  # type: ignore[index]
    return data


@pytest.mark.parametrize(
    ("mutation", "field", "message"),
    [
        ("bad-type", "registers.1.type", "Input should be"),
        ("no-vendor-name", "registers.1.vendor_name", "Field required"),
        ("address-and-point", "registers.1", "exactly one of 'address' or 'point'"),
        ("unknown-field-register", "fields.soc", "no register named 'no_such_register'"),
        ("param-not-allowed", "actions.set_charge_limit.writes.0.param", "'power_w'"),
        ("read-only-target", "actions.safe_mode.writes.0.register", "read-only"),
        ("when-outside-power", "actions.safe_mode.writes.0.when", "only set_active_power"),
        ("capability-without-action", "capabilities", "heartbeat needs action heartbeat"),
        ("unknown-key", "registers.1.gain", "Extra inputs are not permitted"),
        ("min-above-max", "registers.1", "min: greater than max"),
        ("duplicate-register", "registers", "duplicate name(s) rated_capacity"),
        ("derived-unknown-term", "derived.net_w.nope", "no field named 'nope'"),
        ("gap-out-of-range", "transport.read_gap_max", "less than or equal to 124"),
        ("power-without-idle", "actions.set_active_power.writes", "nothing is written when idle"),
        ("sim-status-register", "simulation.behaviour.status.register", "no register named"),
        ("sim-gate-register", "simulation.behaviour.gates.0.register", "no register named"),
        ("sim-sunspec-on-plain", "simulation.behaviour.model", "needs driver: sunspec"),
        ("sim-unknown-model", "simulation.behaviour.model", "Input should be"),
        ("sim-power-through", "simulation.behaviour.power_through", "not a term of derived"),
    ],
)
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, mutation: str, field: str, message: str
) -> None:
    path = _write(tmp_path, _mutate(mutation))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    text = str(info.value)
    assert str(path) in text
    assert field in text
    assert message in text


def test_unmodified_copy_loads(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, _mutate("none"), name="copy"))
    assert profile.name == "copy"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("schema: 1\nname: bad\nregisters: [\n  {name: x\n", encoding="utf-8")
    with pytest.raises(ProfileError, match=r"bad\.yaml: line \d+: not valid YAML"):
        load_profile(path)


def test_file_name_must_match_profile_name(tmp_path: Path) -> None:
    path = _write(tmp_path, _mutate("none"), name="copy")
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ProfileError, match=r"other\.yaml: name: 'copy' must match"):
        load_profile(other)


def test_a_sunspec_profile_cannot_be_laid_out_as_a_plain_map(tmp_path: Path) -> None:
    data = _mutate("none")
    data["driver"] = "sunspec"
    data["sunspec"] = {"models": [1, 802]}
    profile = load_profile(_write(tmp_path, data, name="ss"))
    with pytest.raises(ValueError, match="only a plain profile"):
        ProfileImage(profile)
