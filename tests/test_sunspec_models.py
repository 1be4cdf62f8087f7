"""SunSpec model definitions, point codec and image layout (no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sunspec2 import device as ss_device

from drivers.profile import Profile
from drivers.profile_loader import load_profile, shipped_profiles_dir
from drivers.registers import EncodeError, RegisterType, Table, encode_raw
from drivers.sunspec import SUNS_MARKER, SunSpecError, decode_point, encode_point, load_model
from hil_sim.store import ModbusExceptionCode, RegisterAccessError
from hil_sim.sunspec_image import build_sunspec_image

PCS = shipped_profiles_dir() / "devices" / "industrial-sunspec-pcs.yaml"


@pytest.fixture(scope="module")
def pcs() -> Profile:
    return load_profile(PCS)


# Model lengths (L) as the SunSpec model documents publish them.
@pytest.mark.parametrize(
    ("model_id", "length"), [(1, 66), (124, 24), (203, 105), (704, 65), (713, 7), (802, 62)]
)
def test_model_lengths_match_the_published_models(model_id: int, length: int) -> None:
    assert load_model(model_id).fixed_length == length


def test_offsets_follow_the_json_point_order_and_sizes() -> None:
    raw = json.loads(
        (Path(ss_device.models_dir) / "json" / "model_802.json").read_text(encoding="utf-8")
    )
    offset = 0
    model = load_model(802)
    for p in raw["group"]["points"]:
        assert model.point(p["name"]).offset == offset
        offset += p["size"]
    assert model.point("SoC").sf == "SoC_SF"
    assert model.point("Evt1").symbols["OVER_TEMP_ALARM"] == 1


def test_nested_groups_are_flattened_with_their_parent_scale_factor() -> None:
    m = load_model(704)
    pf = m.point("PFWInj.PF")
    assert pf.sf == "PF_SF"
    assert pf.offset == m.point("PFWInj.Ext").offset - 1


def test_repeating_group_instances_are_named_and_sized() -> None:
    m = load_model(160)
    assert m.repeating is not None
    length = m.length_for(2)
    points = m.points(length)
    first, second = points["module.1.DCA"], points["module.2.DCA"]
    assert second.offset - first.offset == m.repeating.words
    assert m.repeats_for(length) == 2
    with pytest.raises(SunSpecError, match="whole module groups"):
        m.repeats_for(length + 1)


def test_unknown_model_and_point_are_named() -> None:
    with pytest.raises(SunSpecError, match="model 9999"):
        load_model(9999)
    with pytest.raises(SunSpecError, match="no point 'Nope'"):
        load_model(802).point("Nope")


def _point_of_type(ptype: str) -> tuple[int, str]:
    for mid in (802, 704, 713, 124, 1, 203, 702, 122):
        for p in load_model(mid).fixed.values():
            if p.type == ptype and p.name not in ("ID", "L"):
                return mid, p.name
    raise AssertionError(ptype)


@pytest.mark.parametrize(
    ("ptype", "marker"),
    [
        ("int16", [0x8000]),
        ("uint16", [0xFFFF]),
        ("enum16", [0xFFFF]),
        ("bitfield16", [0xFFFF]),
        ("sunssf", [0x8000]),
        ("int32", [0x8000, 0x0000]),
        ("uint32", [0xFFFF, 0xFFFF]),
        ("bitfield32", [0xFFFF, 0xFFFF]),
        ("acc32", [0, 0]),
        ("acc64", [0, 0, 0, 0]),
    ],
)
def test_not_implemented_markers_are_invalid_with_a_reason(ptype: str, marker: list[int]) -> None:
    mid, name = _point_of_type(ptype)
    pdef = load_model(mid).point(name)
    value = decode_point(pdef, marker, 0)
    assert not value.valid
    assert value.value is None
    assert "not implemented" in value.reason
    assert pdef.qualified in value.reason


def test_float32_nan_is_invalid() -> None:
    from drivers.sunspec import PointDef  # noqa: PLC0415 - a point of a vendor float model

    pdef = PointDef(model_id=64999, name="F", offset=2, size=2, type="float32")
    assert not decode_point(pdef, encode_raw(math.nan, RegisterType.F32)).valid
    assert decode_point(pdef, encode_raw(1.5, RegisterType.F32)).value == 1.5


def test_scale_factor_applies_and_a_missing_one_invalidates() -> None:
    soc = load_model(802).point("SoC")
    assert decode_point(soc, [7345], -2).value == pytest.approx(73.45)
    w = load_model(802).point("W")
    assert decode_point(w, encode_raw(-2500, RegisterType.S16), 1).value == -25000
    missing = decode_point(soc, [7345], None)
    assert not missing.valid
    assert "scale factor SoC_SF" in missing.reason


@given(value=st.integers(-3_000_000, 3_000_000).map(lambda v: v / 10), sf=st.integers(-2, 3))
def test_int32_point_round_trip_within_half_a_step(value: float, sf: int) -> None:
    pdef = load_model(704).point("WSet")
    try:
        words = encode_point(pdef, value, sf)
    except EncodeError:
        assert abs(value / 10.0**sf) > 2**31 - 2
        return
    back = decode_point(pdef, words, sf).value
    assert isinstance(back, float | int)
    assert abs(back - value) <= 10.0**sf / 2 + 1e-9


def test_encode_refuses_markers_out_of_range_and_unknown_symbols() -> None:
    hb = load_model(802).point("CtrlHb")
    with pytest.raises(EncodeError, match="not-implemented marker"):
        encode_point(hb, 0xFFFF)
    with pytest.raises(EncodeError):
        encode_point(hb, 70000)
    ena = load_model(704).point("WSetEna")
    assert encode_point(ena, "ENABLED") == [1]
    with pytest.raises(EncodeError, match="DISABLED, ENABLED"):
        encode_point(ena, "ON")


def test_image_lays_out_marker_headers_and_end_model(pcs: Profile) -> None:
    img = build_sunspec_image(pcs, base_address=50000)
    assert img.read(Table.HOLDING, 50000, 2) == list(SUNS_MARKER)
    addr = 50002
    for mid in pcs.sunspec.models if pcs.sunspec else ():
        model_id, length = img.read(Table.HOLDING, addr, 2)
        assert model_id == mid
        assert length == load_model(mid).fixed_length
        addr += 2 + length
    assert img.read(Table.HOLDING, addr, 2) == [0xFFFF, 0]
    assert img.get_point("1.Mn") == "essd-sim"


def test_image_points_in_physical_and_profile_units(pcs: Profile) -> None:
    img = build_sunspec_image(pcs, scale_factors={"802.SoC_SF": -1})
    img.set_point("802.SoC", 55.5)
    assert img.get_point_words("802.SoC") == [555]
    assert img.get_raw("soc") == 555
    assert img.get_value("soc") == pytest.approx(55.5)
    assert img.get_field("soc") == pytest.approx(0.555)
    img.set_field("soc", 0.25)
    assert img.get_point("802.SoC") == pytest.approx(25.0)
    img.set_point("802.SoC", None)
    assert img.get_point("802.SoC") is None
    with pytest.raises(KeyError, match="scale_factors"):
        build_sunspec_image(pcs, scale_factors={"802.Nope_SF": 0})


def test_image_scale_factors_fit_the_ratings(pcs: Profile) -> None:
    img = build_sunspec_image(pcs)
    img.set_point("802.W", -pcs.ratings.max_charge_w)
    img.set_point("704.WSet", pcs.ratings.max_discharge_w)
    img.set_point("713.WHRtg", pcs.ratings.capacity_wh)
    assert img.get_point("802.W") == -pcs.ratings.max_charge_w
    assert img.get_point("713.WHRtg") == pcs.ratings.capacity_wh


def test_image_accepts_writes_to_read_write_points_only(pcs: Profile) -> None:
    img = build_sunspec_image(pcs)
    _, soc, soc_at = img.map.locate("802.SoC")
    with pytest.raises(RegisterAccessError) as info:
        img.write(soc_at, [5000])
    assert info.value.code is ModbusExceptionCode.ILLEGAL_DATA_ADDRESS
    _, _, ena_at = img.map.locate("704.WSetEna")
    with pytest.raises(RegisterAccessError) as info:
        img.write(ena_at, [7])  # not a symbol of WSetEna
    assert info.value.code is ModbusExceptionCode.ILLEGAL_DATA_VALUE
    assert img.get_point("704.WSetEna") == 0
    heard: list[tuple[str, ...]] = []
    img.add_write_listener(heard.append)
    img.write(ena_at, [1])
    assert heard == [("704.WSetEna",)]
    assert soc.offset > 0


def test_image_named_access_matches_the_plain_profile_image(pcs: Profile) -> None:
    img = build_sunspec_image(pcs)
    img.set_field("soc", 0.42)
    assert img.get_field("soc") == pytest.approx(0.42)
    img.set_field("power_w", -30_000)  # charging
    assert img.get_point("802.W") == -30_000
    with pytest.raises(EncodeError, match="outside"):
        img.set_field("soc", 1.2)
    img.set_field("soc", 1.2, check_range=False)  # a BMS misreporting, for fault tests
    assert img.get_field("soc") == pytest.approx(1.2)
    img.set_raw("soc", 0xFFFF)
    assert img.get_field("soc") is None
    assert "soc" in img.names()
    assert img.field_spec("power_w").name == "battery_power_w"
    with pytest.raises(KeyError, match="no field 'nope'"):
        img.field_spec("nope")
