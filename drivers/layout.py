"""Register layout of a plain (address-based) profile, and the value codec both sides share.

The driver decodes what it reads with :func:`decode_register` and encodes what it writes with
:func:`encode_register`; the simulator lays out its register map with
:class:`hil_sim.profile_image.ProfileImage` and sets and gets named values through the very same
functions. So the simulator serves exactly the
profile the driver reads, and the two cannot drift apart.

Physical value = ``raw * scale * 10**sf + offset`` in the register's own unit (``unit:`` in the
profile, e.g. ``kW`` or ``%``). Fields cross into essd in base units: W, Wh, s, and ratios 0..1
for ``%`` (see :func:`to_base`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drivers.profile_parts import Severity
from drivers.registers import (
    ByteOrder,
    EncodeError,
    RegisterType,
    decode_raw,
    encode_raw,
    word_count,
)

if TYPE_CHECKING:
    # Annotations only: the profile schema validates its literal writes with this codec.
    from drivers.profile import RegisterSpec, Transport


# A power register must resolve its unit's rating to at least this fraction (1 %): coarser,
# and every setpoint is rounded to a few levels, or to raw 0 (a scale factor of 15).
MAX_STEP_OF_RATING = 0.01
SF_RANGE = range(-10, 11)  # the scale factors SunSpec allows, and the only ones essd accepts

# The units a register may carry: unit -> (essd base unit, factor to multiply by). Anything
# else is refused when the profile is loaded (``unit: kw`` read as W would be a 1000x error).
# "" is a plain number (a state, a counter, a scale factor).
UNITS: dict[str, tuple[str, float]] = {
    "": ("", 1.0),
    "W": ("W", 1.0),
    "kW": ("W", 1000.0),
    "MW": ("W", 1_000_000.0),
    "VA": ("VA", 1.0),
    "kVA": ("VA", 1000.0),
    "var": ("var", 1.0),
    "kvar": ("var", 1000.0),
    "Wh": ("Wh", 1.0),
    "kWh": ("Wh", 1000.0),
    "MWh": ("Wh", 1_000_000.0),
    "V": ("V", 1.0),
    "mV": ("V", 0.001),
    "A": ("A", 1.0),
    "mA": ("A", 0.001),
    "Ah": ("Ah", 1.0),
    "%": ("ratio", 0.01),
    "ratio": ("ratio", 1.0),
    "degC": ("degC", 1.0),
    "Hz": ("Hz", 1.0),
    "s": ("s", 1.0),
    "ms": ("s", 0.001),
    "min": ("s", 60.0),
    "h": ("s", 3600.0),
}


def unit_problem(unit: str) -> str | None:
    """Why ``unit`` is not one a register may carry, or None."""
    if unit in UNITS:
        return None
    known = ", ".join(repr(u) for u in UNITS if u)
    return f"unknown unit {unit!r} (known: {known}, or '' for a plain number)"


def _unit(unit: str) -> tuple[str, float]:
    try:
        return UNITS[unit]
    except KeyError:
        raise ValueError(unit_problem(unit)) from None


def base_unit(unit: str) -> str:
    """The essd base unit of a register unit (``kW`` -> ``W``, ``%`` -> ``ratio``)."""
    return _unit(unit)[0]


def to_base(value: float, unit: str) -> float:
    """A value in the register's unit converted to essd's base unit."""
    return value * _unit(unit)[1]


def from_base(value: float, unit: str) -> float:
    """A value in essd's base unit converted to the register's unit."""
    return value / _unit(unit)[1]


def orders(spec: RegisterSpec, transport: Transport) -> tuple[ByteOrder, ByteOrder]:
    """(byte order, word order) of ``spec``: its own where it gives them, else the device's."""
    return (spec.byte_order or transport.byte_order, spec.word_order or transport.word_order)


def register_words(spec: RegisterSpec) -> int:
    """How many 16-bit registers ``spec`` occupies."""
    return word_count(spec.rtype, spec.count)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded register: ``value`` in the register's unit, or None with a ``reason``."""

    value: float | str | None
    raw: int | float | str
    reason: str = ""

    @property
    def valid(self) -> bool:
        """True when the value can be used."""
        return self.value is not None


def _quantity(value: float, unit: str) -> str:
    return f"{value:g} {unit}" if unit else f"{value:g}"


def _bound(value: float | None, open_end: str) -> str:
    return open_end if value is None else f"{value:g}"


def _unsigned(raw: int, words: int) -> int:
    return raw % (1 << (16 * words))


def _factor(spec: RegisterSpec, sf: int | None) -> float:
    return spec.scale * (10.0 ** (sf or 0))


def resolution_problem(step_w: float, rating_w: float) -> str | None:
    """Why a register whose raw step is ``step_w`` W cannot carry powers up to ``rating_w``."""
    if rating_w > 0 and step_w > MAX_STEP_OF_RATING * rating_w:
        return (
            f"one raw step is {step_w:g} W, coarser than {MAX_STEP_OF_RATING:.0%} of the "
            f"rating {rating_w:g} W"
        )
    return None


def write_scale_problem(
    spec: RegisterSpec, ratings_w: Iterable[float], *, transport: Transport, sf: int | None = None
) -> str | None:
    """Why writing powers up to each of ``ratings_w`` (W, signed) through ``spec`` would not be
    faithful: a scale factor outside -10..10, a raw step coarser than 1 % of the rating, or a
    rating that does not fit the register type. None when it is fine."""
    if sf is not None and sf not in SF_RANGE:
        return f"scale factor {spec.scale_factor}={sf} outside -10..10"
    for rating in ratings_w:
        if rating == 0:
            continue
        if spec.rtype is not RegisterType.F32:
            problem = resolution_problem(abs(to_base(_factor(spec, sf), spec.unit)), abs(rating))
            if problem is not None:
                return problem
        try:
            encode_register(
                spec, from_base(rating, spec.unit), transport=transport, sf=sf, check_range=False
            )
        except EncodeError as exc:
            return f"the rating {rating:g} W cannot be written: {exc}"
    return None


def decode_register(  # noqa: PLR0911 - one early return per kind of invalid value
    spec: RegisterSpec, words: list[int], *, transport: Transport, sf: int | None = None
) -> Decoded:
    """Decode the words of one register; "not implemented", NaN, bad scale factor or out of
    range give ``value=None`` and a reason, never a number.

    ``sf`` is the raw value of the register's scale-factor register (None when it has none, or
    when that register is itself invalid: then the value is invalid too).
    """
    byte_order, word_order = orders(spec, transport)
    raw = decode_raw(words, spec.rtype, byte_order=byte_order, word_order=word_order)
    if isinstance(raw, str):
        return Decoded(raw, raw)
    if spec.not_implemented and isinstance(raw, int):
        marker = _unsigned(raw, len(words))
        if raw in spec.not_implemented or marker in spec.not_implemented:
            return Decoded(None, raw, f"not implemented (raw 0x{marker:X})")
    if isinstance(raw, float) and not math.isfinite(raw):
        return Decoded(None, raw, f"non-finite value {raw!r}")
    if spec.scale_factor is not None:
        if sf is None:
            return Decoded(None, raw, f"scale factor {spec.scale_factor} is not valid")
        if sf not in SF_RANGE:
            return Decoded(None, raw, f"scale factor {spec.scale_factor}={sf} outside -10..10")
    value = raw * _factor(spec, sf) + spec.offset
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        lo, hi = _bound(spec.min, "-inf"), _bound(spec.max, "inf")
        return Decoded(None, raw, f"{_quantity(value, spec.unit)} outside [{lo}, {hi}]")
    return Decoded(float(value), raw)


def encode_register(
    spec: RegisterSpec,
    value: float | str,
    *,
    transport: Transport,
    sf: int | None = None,
    check_range: bool = True,
) -> list[int]:
    """Encode a physical value (register's unit) into words; EncodeError naming the register
    when it is outside the register's min/max or does not fit its type."""
    byte_order, word_order = orders(spec, transport)
    if spec.rtype is RegisterType.STRING:
        return encode_raw(
            str(value),
            spec.rtype,
            byte_order=byte_order,
            word_order=word_order,
            string_words=spec.count,
        )
    if isinstance(value, str):
        raise EncodeError(f"register {spec.name}: {value!r} is not a number")
    if not math.isfinite(value):
        raise EncodeError(f"register {spec.name}: {value!r} is not a finite number")
    if check_range and (
        (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max)
    ):
        raise EncodeError(
            f"register {spec.name}: {_quantity(value, spec.unit)} outside "
            f"[{_bound(spec.min, '-inf')}, {_bound(spec.max, 'inf')}]"
        )
    if spec.scale_factor is not None and sf is None:
        raise EncodeError(f"register {spec.name}: scale factor {spec.scale_factor} is not valid")
    raw: float = (value - spec.offset) / _factor(spec, sf)
    if spec.rtype is not RegisterType.F32:
        raw = round(raw)
    try:
        return encode_raw(raw, spec.rtype, byte_order=byte_order, word_order=word_order)
    except EncodeError as exc:
        raise EncodeError(f"register {spec.name}: {_quantity(value, spec.unit)}: {exc}") from None


@dataclass(frozen=True, slots=True)
class StateFinding:
    """What one state value or one set alarm bit of a register means, and how bad it is."""

    register: str
    raw: int
    name: str
    severity: Severity


def classify_states(spec: RegisterSpec, raw: int, words: int) -> tuple[StateFinding, ...]:
    """The meanings of ``raw`` for a register with an ``enum`` (one finding, listed or not) or
    ``bits`` (one finding per set bit); () for a register with neither."""
    value = raw % (1 << (16 * words))
    if spec.enum is not None:
        meaning = spec.enum.get(raw, spec.enum.get(value))
        if meaning is None:
            return (StateFinding(spec.name, value, f"unlisted value {value}", spec.unlisted),)
        return (StateFinding(spec.name, value, meaning.name, meaning.severity),)
    if spec.bits is None:
        return ()
    out = []
    for bit in range(16 * words):
        if (value >> bit) & 1:
            meaning = spec.bits.get(bit)
            out.append(
                StateFinding(spec.name, 1 << bit, f"unlisted bit {bit}", spec.unlisted)
                if meaning is None
                else StateFinding(spec.name, 1 << bit, meaning.name, meaning.severity)
            )
    return tuple(out)
