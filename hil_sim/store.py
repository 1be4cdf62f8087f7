"""What a simulated device serves: the register-store protocol, its errors, and an in-memory
register image. :class:`hil_sim.modbus_server.ModbusServer` serves any :class:`RegisterStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Protocol

from drivers.registers import Table


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
