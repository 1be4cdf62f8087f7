"""Register types and their encoding.

This module is pure (no I/O and no pymodbus): the driver decodes what it reads with it, and the
simulator (:mod:`hil_sim.store`) lays out its register map with it, so the two cannot drift apart.

A register's physical value is ``raw * scale * 10**sf + offset`` where ``sf`` is the value of
its scale-factor register (SunSpec style) or 0.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from enum import StrEnum


class Table(StrEnum):
    """Modbus data table of a register."""

    HOLDING = "holding"  # function codes 3 (read), 6/16 (write)
    INPUT = "input"  # function code 4 (read only)


class RegisterType(StrEnum):
    """How the words of a register decode."""

    U16 = "u16"
    S16 = "s16"
    U32 = "u32"
    S32 = "s32"
    U64 = "u64"
    S64 = "s64"
    F32 = "f32"
    STRING = "string"


class ByteOrder(StrEnum):
    """Order of bytes inside a word, or of words inside a multi-word value."""

    BIG = "big"
    LITTLE = "little"


_WORDS = {
    RegisterType.U16: 1,
    RegisterType.S16: 1,
    RegisterType.U32: 2,
    RegisterType.S32: 2,
    RegisterType.U64: 4,
    RegisterType.S64: 4,
    RegisterType.F32: 2,
}
_STRUCT = {
    RegisterType.U16: "H",
    RegisterType.S16: "h",
    RegisterType.U32: "I",
    RegisterType.S32: "i",
    RegisterType.U64: "Q",
    RegisterType.S64: "q",
    RegisterType.F32: "f",
}


class EncodeError(ValueError):
    """A value cannot be represented in a register of the given type."""


def word_count(rtype: RegisterType, string_words: int | None = None) -> int:
    """Number of 16-bit registers a value of ``rtype`` occupies."""
    if rtype is RegisterType.STRING:
        if not string_words or string_words < 1:
            raise ValueError("count: a string register needs a word count >= 1")
        return string_words
    return _WORDS[rtype]


def _to_bytes(words: Sequence[int], byte_order: ByteOrder, word_order: ByteOrder) -> bytes:
    ordered = list(words) if word_order is ByteOrder.BIG else list(reversed(words))
    out = bytearray()
    for w in ordered:
        if not 0 <= w <= 0xFFFF:
            raise ValueError(f"register word out of range: {w!r}")
        hi, lo = w >> 8, w & 0xFF
        out += bytes((hi, lo)) if byte_order is ByteOrder.BIG else bytes((lo, hi))
    return bytes(out)


def _from_bytes(data: bytes, byte_order: ByteOrder, word_order: ByteOrder) -> list[int]:
    words = []
    for i in range(0, len(data), 2):
        a, b = data[i], data[i + 1]
        words.append((a << 8) | b if byte_order is ByteOrder.BIG else (b << 8) | a)
    return words if word_order is ByteOrder.BIG else list(reversed(words))


def decode_raw(
    words: Sequence[int],
    rtype: RegisterType,
    *,
    byte_order: ByteOrder = ByteOrder.BIG,
    word_order: ByteOrder = ByteOrder.BIG,
) -> int | float | str:
    """Decode register words into the raw (unscaled) value of ``rtype``."""
    data = _to_bytes(words, byte_order, word_order)
    if rtype is RegisterType.STRING:
        return data.split(b"\x00", 1)[0].decode("ascii", errors="replace").rstrip()
    if len(words) != _WORDS[rtype]:
        raise ValueError(f"{rtype.value} needs {_WORDS[rtype]} words, got {len(words)}")
    (value,) = struct.unpack(">" + _STRUCT[rtype], data)
    return value  # type: ignore[no-any-return]


def encode_raw(
    value: int | float | str,
    rtype: RegisterType,
    *,
    byte_order: ByteOrder = ByteOrder.BIG,
    word_order: ByteOrder = ByteOrder.BIG,
    string_words: int | None = None,
) -> list[int]:
    """Encode a raw (unscaled) value into register words; raises EncodeError if it cannot."""
    if rtype is RegisterType.STRING:
        n = word_count(rtype, string_words)
        data = str(value).encode("ascii", errors="strict")
        if len(data) > 2 * n:
            raise EncodeError(f"string of {len(data)} bytes does not fit {n} registers")
        return _from_bytes(data.ljust(2 * n, b"\x00"), byte_order, word_order)
    if isinstance(value, str):
        raise EncodeError(f"{rtype.value} register cannot hold a string")
    if rtype is RegisterType.F32:
        if math.isnan(value):
            packed = struct.pack(">f", value)
        else:
            try:
                packed = struct.pack(">f", value)
            except OverflowError as exc:
                raise EncodeError(f"{value!r} does not fit f32") from exc
    else:
        if not isinstance(value, int):
            if not math.isfinite(value) or value != int(value):
                raise EncodeError(f"{value!r} is not an integer for {rtype.value}")
            value = int(value)
        try:
            packed = struct.pack(">" + _STRUCT[rtype], value)
        except struct.error as exc:
            raise EncodeError(f"{value!r} out of range for {rtype.value}") from exc
    return _from_bytes(packed, byte_order, word_order)
