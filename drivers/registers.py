"""Register types, encoding and an in-memory register image.

This module is pure (no I/O and no pymodbus): the driver decodes what it reads with it, and the
simulator lays out its register map with it, so the two cannot drift apart.

A register's physical value is ``raw * scale * 10**sf + offset`` where ``sf`` is the value of
its scale-factor register (SunSpec style) or 0.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from enum import IntEnum, StrEnum
from typing import Protocol

__all__ = [
    "ByteOrder",
    "EncodeError",
    "ModbusExceptionCode",
    "NoResponse",
    "RegisterAccessError",
    "RegisterImage",
    "RegisterStore",
    "RegisterType",
    "Table",
    "decode_raw",
    "encode_raw",
    "word_count",
]


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


class ModbusExceptionCode(IntEnum):
    """Modbus exception codes a device answers with."""

    ILLEGAL_FUNCTION = 1
    ILLEGAL_DATA_ADDRESS = 2
    ILLEGAL_DATA_VALUE = 3
    SERVER_DEVICE_FAILURE = 4
    SERVER_DEVICE_BUSY = 6


class RegisterAccessError(Exception):
    """A register store refuses a request; the server answers with ``code``."""

    def __init__(self, code: ModbusExceptionCode, message: str = "") -> None:
        super().__init__(message or code.name)
        self.code = code


class NoResponse(Exception):
    """A register store stays silent: the server sends no answer at all.

    This is an unplugged portable unit or a dead device behind a gateway: the client sees a
    timeout, not an exception response.
    """


class RegisterStore(Protocol):
    """What a Modbus server serves: the simulator's devices implement this.

    ``read`` and ``write`` raise :class:`RegisterAccessError` to answer with a Modbus exception,
    or :class:`NoResponse` to send nothing.
    """

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Words ``address .. address+count-1`` of ``table``."""
        ...

    def write(self, address: int, values: Sequence[int]) -> None:
        """Write holding registers starting at ``address``."""
        ...


class RegisterImage:
    """A sparse in-memory register map that implements :class:`RegisterStore`.

    Only defined addresses can be read or written; others answer ILLEGAL_DATA_ADDRESS, as a
    real device does.
    """

    def __init__(self) -> None:
        self._words: dict[Table, dict[int, int]] = {Table.HOLDING: {}, Table.INPUT: {}}

    def define(self, table: Table, address: int, count: int, fill: int = 0) -> None:
        """Make ``count`` registers from ``address`` exist, initialised to ``fill``."""
        if address < 0 or address + count > 0x10000:
            raise ValueError(f"address: {address}+{count} outside 0..65535")
        for a in range(address, address + count):
            self._words[table].setdefault(a, fill)

    def defined(self, table: Table, address: int, count: int = 1) -> bool:
        """True when every register of the range exists."""
        words = self._words[table]
        return all(a in words for a in range(address, address + count))

    def get(self, table: Table, address: int, count: int) -> list[int]:
        """Words of a defined range (KeyError naming the address otherwise)."""
        words = self._words[table]
        try:
            return [words[a] for a in range(address, address + count)]
        except KeyError as exc:
            raise KeyError(f"{table.value} register {exc.args[0]} is not defined") from None

    def set(self, table: Table, address: int, values: Sequence[int]) -> None:
        """Set words of a defined range."""
        if not self.defined(table, address, len(values)):
            raise KeyError(f"{table.value} registers {address}+{len(values)} not all defined")
        for i, v in enumerate(values):
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"register word out of range: {v!r}")
            self._words[table][address + i] = v

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """RegisterStore read: ILLEGAL_DATA_ADDRESS for undefined registers."""
        if count < 1 or not self.defined(table, address, count):
            raise RegisterAccessError(ModbusExceptionCode.ILLEGAL_DATA_ADDRESS)
        return self.get(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        """RegisterStore write: ILLEGAL_DATA_ADDRESS for undefined registers."""
        if not values or not self.defined(Table.HOLDING, address, len(values)):
            raise RegisterAccessError(ModbusExceptionCode.ILLEGAL_DATA_ADDRESS)
        self.set(Table.HOLDING, address, values)
