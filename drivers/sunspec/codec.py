"""SunSpec point values: decoding and encoding a point's words with its scale factor.

"Not implemented" values (0xFFFF for uint16/enum16/bitfield16, 0x8000 for int16 and sunssf,
0x80000000 for int32, 0xFFFFFFFF for uint32/enum32/bitfield32, 0 for accumulators, NaN for
float32; the constants are pysunspec2's) become invalid values with a reason, never numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sunspec2 import mb as ss_mb

from drivers.layout import SF_RANGE, Decoded
from drivers.registers import EncodeError, decode_raw, encode_raw
from drivers.sunspec.models import PointDef


def is_not_implemented(pdef: PointDef, raw: int | float | str) -> bool:
    if pdef.type == "float32":
        return isinstance(raw, float) and math.isnan(raw)
    if pdef.type == "string":
        return raw == ""
    if pdef.type == "pad":
        return False
    info = ss_mb.point_type_info.get(pdef.type)
    return info is not None and not info.is_impl(raw)


def decode_point(pdef: PointDef, words: Sequence[int], sf: int | None = None) -> Decoded:
    """Decode a point's words; ``sf`` is the value of its scale-factor point (None if unread).

    Not-implemented markers and NaN give an invalid value with a reason.
    """
    raw = decode_raw(words, pdef.register_type)
    if is_not_implemented(pdef, raw):
        shown = "0x" + "".join(f"{w:04X}" for w in words)
        return Decoded(None, raw, f"{pdef.qualified} not implemented ({shown})")
    if isinstance(raw, str):
        return Decoded(raw, raw)
    if isinstance(pdef.sf, int):
        sf = pdef.sf
    elif pdef.sf is not None:
        if sf is None:
            return Decoded(None, raw, f"{pdef.qualified}: scale factor {pdef.sf} not implemented")
        if sf not in SF_RANGE:
            return Decoded(None, raw, f"{pdef.qualified}: scale factor {sf} outside -10..10")
    else:
        sf = 0
    if not sf:
        return Decoded(raw, raw)
    # Dividing by the power of ten keeps decimals exact: 7340 / 100 is 73.4, not 73.40000001.
    return Decoded(raw / 10.0**-sf if sf < 0 else raw * 10.0**sf, raw)


def encode_point(pdef: PointDef, value: float | str | None, sf: int | None = None) -> list[int]:
    """Encode a physical value (or an enumeration symbol name) into the point's words.

    ``None`` encodes the not-implemented marker. Raises EncodeError when the value does not
    fit, or would encode to the not-implemented marker.
    """
    rtype = pdef.register_type
    if value is None:
        if pdef.type == "float32":
            return encode_raw(math.nan, rtype)
        if pdef.type == "string":
            return [0] * pdef.size
        return encode_raw(int(ss_mb.unimpl_value[pdef.type]), rtype)
    if pdef.type == "string":
        return encode_raw(str(value), rtype, string_words=pdef.size)
    if isinstance(value, str):
        if value not in pdef.symbols:
            raise EncodeError(
                f"{pdef.qualified}: {value!r} is not one of "
                f"{', '.join(pdef.symbols) or 'no symbols'}"
            )
        raw: int | float = pdef.symbols[value]
    else:
        exp = pdef.sf if isinstance(pdef.sf, int) else (sf if pdef.sf is not None else 0)
        if exp is None:
            raise EncodeError(f"{pdef.qualified}: scale factor {pdef.sf} unknown")
        if exp not in SF_RANGE:
            raise EncodeError(f"{pdef.qualified}: scale factor {exp} outside -10..10")
        if not math.isfinite(value):
            raise EncodeError(f"{pdef.qualified}: {value!r} is not a finite number")
        raw = value / 10.0**exp if pdef.type == "float32" else round(value / 10.0**exp)
    words = encode_raw(raw, rtype)
    # An accumulator's 0 is "not accumulated", a value a writer may legitimately reset to.
    if is_not_implemented(pdef, decode_raw(words, rtype)) and not pdef.type.startswith("acc"):
        raise EncodeError(f"{pdef.qualified}: {value!r} encodes to the not-implemented marker")
    return words
