"""The simulator's register map of a plain (address-based) profile, with named access.

Values go in and out through the codec the driver uses (:mod:`drivers.layout`), so the simulator
serves exactly the profile the driver reads. Semantic fields are in essd base units (W, Wh, s,
ratio 0..1); registers in their own unit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from drivers.layout import (
    Decoded,
    decode_register,
    encode_register,
    from_base,
    orders,
    register_words,
    to_base,
)
from drivers.profile import Profile, RegisterSpec
from drivers.registers import Table, decode_raw, encode_raw
from hil_sim.store import ModbusExceptionCode, RegisterAccessError, RegisterImage


class _NamedValues(Protocol):
    """Register access by name in the register's own unit (what :class:`FieldAccess` needs)."""

    @property
    def profile(self) -> Profile:
        """The profile the image is laid out from."""
        ...

    def get_value(self, name: str) -> float | str | None:
        """A register's value in its own unit, None when invalid or not implemented."""
        ...

    def set_value(self, name: str, value: float | str, *, check_range: bool = True) -> None:
        """Set a register to a value in its own unit."""
        ...


class FieldAccess:
    """Semantic-field access in essd base units, on an image with by-name register access."""

    def field_spec(self: _NamedValues, field: str) -> RegisterSpec:
        """The register mapped to a semantic field."""
        spec = self.profile.field_register(field)
        if spec is None:
            raise KeyError(f"profile {self.profile.name}: no field {field!r}")
        return spec

    def get_field(self: _NamedValues, field: str) -> float | str | None:
        """A semantic field in essd base units (W, Wh, s, ratio), None when not valid."""
        spec = FieldAccess.field_spec(self, field)
        v = self.get_value(spec.name)
        return to_base(v, spec.unit) if isinstance(v, float | int) else v

    def set_field(
        self: _NamedValues, field: str, value: float | str, *, check_range: bool = True
    ) -> None:
        """Set a semantic field from essd base units (W, Wh, s, ratio)."""
        spec = FieldAccess.field_spec(self, field)
        physical = value if isinstance(value, str) else from_base(value, spec.unit)
        self.set_value(spec.name, physical, check_range=check_range)


class ProfileImage(FieldAccess, RegisterImage):
    """A :class:`RegisterImage` laid out from a plain profile, with named physical access.

    Every register of the profile exists (initialised to 0), plus the gaps a block read may
    span (``transport.read_gap_max``), so a driver reading this image reads what it would read
    from the device. It is a RegisterStore: :class:`hil_sim.modbus_server.ModbusServer` serves it.
    """

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        if profile.driver != "generic":
            raise ValueError(f"profile {profile.name}: only a plain profile can be laid out")
        self.profile = profile
        self._specs = {r.name: r for r in profile.registers}
        self._owner: dict[int, RegisterSpec] = {}  # holding address -> register covering it
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []
        spans: dict[Table, list[tuple[int, int]]] = {Table.HOLDING: [], Table.INPUT: []}
        for spec in profile.registers:
            assert spec.address is not None  # a generic profile has no SunSpec points
            self.define(spec.table, spec.address, register_words(spec))
            spans[spec.table].append((spec.address, spec.address + register_words(spec)))
            if spec.table is Table.HOLDING:
                for a in range(spec.address, spec.address + register_words(spec)):
                    self._owner[a] = spec
        # Registers a profile writes with function 16 only: the device refuses function 6 there.
        self._fc16_only = {
            address
            for act in profile.actions.values()
            for step in act.writes
            if step.function == 16
            for address in self._span(self._specs[step.register])
        }
        self.function_counts: dict[int, int] = {}  # write requests served, by function code
        gap_max = profile.transport.read_gap_max
        for table, ranges in spans.items():
            ranges.sort()
            for (_, end), (start, _) in itertools.pairwise(ranges):
                if 0 < start - end <= gap_max:
                    self.define(table, end, start - end)

    @staticmethod
    def _span(spec: RegisterSpec) -> range:
        assert spec.address is not None
        return range(spec.address, spec.address + register_words(spec))

    def accepts_function(self, func_code: int, address: int) -> bool:
        """Whether a write with ``func_code`` at ``address`` is taken (the server asks)."""
        self.function_counts[func_code] = self.function_counts.get(func_code, 0) + 1
        return not (func_code == 6 and address in self._fc16_only)

    def add_write_listener(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``callback(register names)`` after every write a Modbus client makes."""
        self._listeners.append(callback)

    def write(self, address: int, values: Sequence[int]) -> None:
        """RegisterStore write, as the device takes it: only writable registers accept one.

        Read-only registers and unassigned addresses answer ILLEGAL_DATA_ADDRESS. The simulator
        itself sets any register with :meth:`set_value` / :meth:`set_raw`.
        """
        names: list[str] = []
        for a in range(address, address + len(values)):
            spec = self._owner.get(a)
            if spec is None or spec.access == "r":
                raise RegisterAccessError(ModbusExceptionCode.ILLEGAL_DATA_ADDRESS)
            if spec.name not in names:
                names.append(spec.name)
        super().write(address, values)
        for callback in list(self._listeners):
            callback(tuple(names))

    def spec(self, name: str) -> RegisterSpec:
        """The register called ``name`` (KeyError naming it otherwise)."""
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"profile {self.profile.name}: no register {name!r}") from None

    def _location(self, spec: RegisterSpec) -> tuple[Table, int, int]:
        assert spec.address is not None
        return spec.table, spec.address, register_words(spec)

    def _sf(self, spec: RegisterSpec) -> int | None:
        if spec.scale_factor is None:
            return None
        raw = self.get_raw(spec.scale_factor)
        return raw if isinstance(raw, int) else None

    def get_raw(self, name: str) -> int | float | str:
        """The raw (unscaled) value of a register."""
        spec = self.spec(name)
        byte_order, word_order = orders(spec, self.profile.transport)
        return decode_raw(
            self.get(*self._location(spec)),
            spec.rtype,
            byte_order=byte_order,
            word_order=word_order,
        )

    def set_raw(self, name: str, raw: int | float | str) -> None:
        """Set a register's raw value (e.g. 0x8000 "not implemented" or NaN for fault tests)."""
        spec = self.spec(name)
        byte_order, word_order = orders(spec, self.profile.transport)
        words = encode_raw(
            raw, spec.rtype, byte_order=byte_order, word_order=word_order, string_words=spec.count
        )
        table, address, _ = self._location(spec)
        self.set(table, address, words)

    def value(self, name: str) -> Decoded:
        """A register's decoded value in its own unit (invalid values carry a reason)."""
        spec = self.spec(name)
        return decode_register(
            spec,
            self.get(*self._location(spec)),
            transport=self.profile.transport,
            sf=self._sf(spec),
        )

    def get_value(self, name: str) -> float | str | None:
        """A register's value in its own unit, None when it is not valid."""
        return self.value(name).value

    def set_value(self, name: str, value: float | str, *, check_range: bool = True) -> None:
        """Set a register to a physical value in its own unit."""
        spec = self.spec(name)
        words = encode_register(
            spec,
            value,
            transport=self.profile.transport,
            sf=self._sf(spec),
            check_range=check_range,
        )
        table, address, _ = self._location(spec)
        self.set(table, address, words)

    def names(self) -> Iterable[str]:
        """Names of every register of the profile."""
        return self._specs.keys()
