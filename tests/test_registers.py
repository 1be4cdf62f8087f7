"""Register encoding round trips for every type and byte/word order."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.registers import ByteOrder, EncodeError, RegisterType, Table, decode_raw, encode_raw
from hil_sim.store import ModbusExceptionCode, RegisterAccessError, RegisterImage

orders = st.sampled_from(list(ByteOrder))
RANGES = {
    RegisterType.U16: (0, 2**16 - 1),
    RegisterType.S16: (-(2**15), 2**15 - 1),
    RegisterType.U32: (0, 2**32 - 1),
    RegisterType.S32: (-(2**31), 2**31 - 1),
    RegisterType.U64: (0, 2**64 - 1),
    RegisterType.S64: (-(2**63), 2**63 - 1),
}


@given(data=st.data(), byte_order=orders, word_order=orders)
def test_integer_round_trip(
    data: st.DataObject, byte_order: ByteOrder, word_order: ByteOrder
) -> None:
    rtype = data.draw(st.sampled_from(list(RANGES)))
    lo, hi = RANGES[rtype]
    value = data.draw(st.integers(lo, hi))
    words = encode_raw(value, rtype, byte_order=byte_order, word_order=word_order)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode_raw(words, rtype, byte_order=byte_order, word_order=word_order) == value


@given(
    value=st.floats(width=32, allow_nan=False),
    byte_order=orders,
    word_order=orders,
)
def test_f32_round_trip(value: float, byte_order: ByteOrder, word_order: ByteOrder) -> None:
    words = encode_raw(value, RegisterType.F32, byte_order=byte_order, word_order=word_order)
    back = decode_raw(words, RegisterType.F32, byte_order=byte_order, word_order=word_order)
    assert back == struct.unpack(">f", struct.pack(">f", value))[0]


def test_f32_nan_decodes_as_nan() -> None:
    words = encode_raw(math.nan, RegisterType.F32)
    assert math.isnan(float(decode_raw(words, RegisterType.F32)))


@given(
    text=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=16),
    byte_order=orders,
    word_order=orders,
)
def test_string_round_trip(text: str, byte_order: ByteOrder, word_order: ByteOrder) -> None:
    words = encode_raw(
        text, RegisterType.STRING, byte_order=byte_order, word_order=word_order, string_words=8
    )
    assert len(words) == 8
    kw = {"byte_order": byte_order, "word_order": word_order}
    assert decode_raw(words, RegisterType.STRING, **kw) == text


def test_word_order_is_what_vendors_mean() -> None:
    # 0x12345678 big-endian words: [0x1234, 0x5678]; "word swapped" (little word order): reversed.
    assert encode_raw(0x12345678, RegisterType.U32) == [0x1234, 0x5678]
    assert encode_raw(0x12345678, RegisterType.U32, word_order=ByteOrder.LITTLE) == [0x5678, 0x1234]
    assert encode_raw(0x1234, RegisterType.U16, byte_order=ByteOrder.LITTLE) == [0x3412]


@pytest.mark.parametrize(
    ("value", "rtype"),
    [
        (70000, RegisterType.U16),
        (-1, RegisterType.U32),
        (1.5, RegisterType.S16),
        ("x", RegisterType.U16),
    ],
)
def test_unrepresentable_values_are_refused(value: float | str, rtype: RegisterType) -> None:
    with pytest.raises(EncodeError):
        encode_raw(value, rtype)


def test_register_image_refuses_undefined_addresses() -> None:
    image = RegisterImage()
    image.define(Table.HOLDING, 100, 4)
    image.write(101, [7, 8])
    assert image.read(Table.HOLDING, 100, 4) == [0, 7, 8, 0]
    with pytest.raises(RegisterAccessError) as info:
        image.read(Table.HOLDING, 102, 4)
    assert info.value.code is ModbusExceptionCode.ILLEGAL_DATA_ADDRESS
    with pytest.raises(RegisterAccessError):
        image.read(Table.INPUT, 100, 1)
