"""SunSpec: model definitions, discovery and a profile-driven driver.

Everything about a SunSpec point (offset inside its model, type, size, scale-factor point,
units, access, enumeration and bitfield symbols) comes from the JSON model definitions that the
pysunspec2 package ships (``sunspec2/models/json/model_<id>.json``), loaded with its own loader.
No offset is typed by hand here, so the driver and the simulator image
(:mod:`hil_sim.sunspec_image`) read one source.

Discovery follows the SunSpec Information Model specification: the "SunS" marker
(0x53756e53) at one of the base addresses (40000, 0, 50000 by default, or the profile's), then a
chain of (model id, length) headers up to the end model 0xFFFF.

"Not implemented" values (0xFFFF for uint16/enum16/bitfield16, 0x8000 for int16 and sunssf,
0x80000000 for int32, 0xFFFFFFFF for uint32/enum32/bitfield32, 0 for accumulators, NaN for
float32; the constants are pysunspec2's) become invalid readings with a reason, never numbers.

Sign conventions at this boundary (the profile's ``scale`` maps a device that differs):

- Model 704 ``WSet`` is the active power setpoint in W; the model's comment on its group says
  "Set Active Power Level (may be negative for charging)": > 0 injects (discharges into the site),
  < 0 absorbs (charges) -- the battery sign of essd, so it is written unchanged.
- Model 802 ``W`` is "total power flowing to/from the battery bank" (a DC measurement); the
  model leaves its sign to the device. The shipped industrial profile follows the 704 sense
  (> 0 discharging), which the simulator serves; a unit that reports charging as positive sets
  ``scale: -1`` on that register.
- Model 203 ``W`` (meter): see ``profiles/devices/site-meter-sunspec.yaml``.

Control as the shipped industrial profile maps it (all of it profile data, none of it code):
heartbeat = the controller heartbeat ``802.CtrlHb`` (read-write in the shipped 802 definition;
the battery's own counter is ``802.Hb``); revert timer = 704 ``WSetRvrt`` 0 W,
``WSetEnaRvrt`` ENABLED, ``WSetRvrtTms`` seconds (on expiry the PCS holds an enabled 0 W);
safe mode = ``WSet`` 0 W first, then ``WSetEna`` DISABLED. Register units convert to essd's
base units as for plain profiles (``%`` -> ratio, ``kW`` -> W; :mod:`drivers.layout`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from sunspec2 import device as ss_device
from sunspec2 import mb as ss_mb
from sunspec2 import mdef as ss_mdef

from drivers.api import (
    CommunicationError,
    DeviceError,
    DeviceExceptionResponse,
    ValueRefused,
    WriteResult,
)
from drivers.base import TIME_PARAMS, ProfileDriver, Sense, live_limit_w
from drivers.layout import base_unit, from_base, resolution_problem, to_base
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Profile, ProfileError, RegisterSpec
from drivers.registers import (
    EncodeError,
    RegisterType,
    Table,
    decode_raw,
    encode_raw,
)
from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.domain import (
    LiveLimits,
    Quality,
    Reading,
)

__all__ = [
    "ENUM_TYPES",
    "SUNS_MARKER",
    "DiscoveredModel",
    "ModelDef",
    "PointDef",
    "PointValue",
    "RegisterEndpoint",
    "SunSpecDiscoveryError",
    "SunSpecDriver",
    "SunSpecError",
    "SunSpecMap",
    "decode_point",
    "discover",
    "encode_point",
    "is_not_implemented",
    "load_model",
    "parse_point_ref",
]

# "SunS" as two big-endian registers: the marker at a SunSpec base address.
SUNS_MARKER = (0x5375, 0x6E53)
END_MODEL_ID: int = ss_mb.SUNS_END_MODEL_ID
_MAX_MODELS = 128  # a walk longer than this is a device answering garbage, not a real map
_SF_RANGE = range(-10, 11)  # sunssf values the specification allows

# SunSpec point type -> how the words decode with the shared register codec.
_REGISTER_TYPE: dict[str, RegisterType] = {
    "int16": RegisterType.S16,
    "sunssf": RegisterType.S16,
    "uint16": RegisterType.U16,
    "count": RegisterType.U16,
    "acc16": RegisterType.U16,
    "enum16": RegisterType.U16,
    "bitfield16": RegisterType.U16,
    "pad": RegisterType.U16,
    "int32": RegisterType.S32,
    "uint32": RegisterType.U32,
    "acc32": RegisterType.U32,
    "enum32": RegisterType.U32,
    "bitfield32": RegisterType.U32,
    "ipaddr": RegisterType.U32,
    "int64": RegisterType.S64,
    "uint64": RegisterType.U64,
    "acc64": RegisterType.U64,
    "float32": RegisterType.F32,
    "string": RegisterType.STRING,
}
_BITFIELDS = frozenset({"bitfield16", "bitfield32"})
ENUM_TYPES = frozenset({"enum16", "enum32"})


class SunSpecError(DeviceError):
    """A SunSpec-level problem: unknown model or point, value that cannot be encoded."""


class SunSpecDiscoveryError(SunSpecError):
    """No SunSpec map found, a malformed model chain, or a model the profile needs is missing."""


# --------------------------------------------------------------------------------------------
# Model definitions (from pysunspec2's JSON files)


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a SunSpec model, as its definition describes it.

    ``offset`` counts words from the model's ID register (ID is 0, L is 1, the first point 2).
    ``sf`` is the name of the sunssf point (same model) or a constant exponent, or None.
    """

    model_id: int
    name: str
    offset: int
    size: int
    type: str
    sf: str | int | None = None
    units: str = ""
    access: str = "R"
    mandatory: bool = False
    static: bool = False
    label: str = ""
    symbols: Mapping[str, int] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        """``"<model>.<point>"``, the form profiles use."""
        return f"{self.model_id}.{self.name}"

    @property
    def writable(self) -> bool:
        """True for read-write points."""
        return self.access == "RW"

    @property
    def register_type(self) -> RegisterType:
        """How the point's words decode (SunSpecError for types essd does not decode)."""
        try:
            return _REGISTER_TYPE[self.type]
        except KeyError:
            raise SunSpecError(f"point {self.qualified}: type {self.type} not supported") from None

    def symbol_name(self, value: int) -> str | None:
        """The enumeration symbol for ``value`` (None when the definition has none)."""
        for name, v in self.symbols.items():
            if v == value:
                return name
        return None


@dataclass(frozen=True, slots=True)
class _RepeatingGroup:
    name: str
    words: int
    points: tuple[PointDef, ...]  # offsets relative to the start of one instance


@dataclass(frozen=True, slots=True)
class ModelDef:
    """A SunSpec model: its fixed points and, for some models, a repeating group at the end."""

    model_id: int
    name: str
    label: str
    fixed: Mapping[str, PointDef]
    fixed_words: int  # words of the fixed part, ID and L included
    repeating: _RepeatingGroup | None = None

    @property
    def fixed_length(self) -> int:
        """The model length ``L`` with no repeating instances (words after the L register)."""
        return self.fixed_words - 2

    def length_for(self, repeats: int = 0) -> int:
        """``L`` of this model with ``repeats`` instances of its repeating group."""
        if repeats and self.repeating is None:
            raise SunSpecError(f"model {self.model_id} has no repeating group")
        words = self.repeating.words if self.repeating else 0
        return self.fixed_length + repeats * words

    def repeats_for(self, length: int) -> int:
        """Instances of the repeating group in a model of length ``length`` (error if ragged)."""
        extra = length - self.fixed_length
        if extra < 0:
            raise SunSpecError(
                f"model {self.model_id}: length {length} is shorter than its definition's "
                f"{self.fixed_length}"
            )
        if self.repeating is None:
            # Devices may pad a model beyond its definition (older revisions): tolerate it.
            return 0
        if extra % self.repeating.words:
            raise SunSpecError(
                f"model {self.model_id}: length {length} is not {self.fixed_length} plus whole "
                f"{self.repeating.name} groups of {self.repeating.words} words"
            )
        return extra // self.repeating.words

    def points(self, length: int | None = None) -> dict[str, PointDef]:
        """Every point of a model of length ``length`` (default: no repeating instances).

        Points of the n-th repeating instance (1-based) are named ``<group>.<n>.<point>``.
        """
        out = dict(self.fixed)
        repeats = 0 if length is None else self.repeats_for(length)
        if self.repeating is not None:
            for i in range(repeats):
                base = self.fixed_words + i * self.repeating.words
                for p in self.repeating.points:
                    name = f"{self.repeating.name}.{i + 1}.{p.name}"
                    out[name] = _replace(p, name=name, offset=base + p.offset)
        return out

    def point(self, name: str, length: int | None = None) -> PointDef:
        """The point called ``name`` (SunSpecError naming the model otherwise).

        Without ``length``, a repeating-group point ``<group>.<n>.<point>`` is checked against
        the definition only; with it, instance ``n`` must exist in a model that long.
        """
        if length is not None:
            found = self.points(length).get(name)
        else:
            found = self.fixed.get(name) or self._repeating_point(name)
        if found is None:
            raise SunSpecError(f"model {self.model_id} ({self.name}) has no point {name!r}")
        return found

    def _repeating_point(self, name: str) -> PointDef | None:
        rep = self.repeating
        group, _, rest = name.partition(".")
        index, _, pname = rest.partition(".")
        if rep is None or group != rep.name or not index.isdigit() or int(index) < 1:
            return None
        for p in rep.points:
            if p.name == pname:
                offset = self.fixed_words + (int(index) - 1) * rep.words + p.offset
                return _replace(p, name=name, offset=offset)
        return None


def _replace(p: PointDef, *, name: str, offset: int) -> PointDef:
    return PointDef(
        model_id=p.model_id,
        name=name,
        offset=offset,
        size=p.size,
        type=p.type,
        sf=p.sf,
        units=p.units,
        access=p.access,
        mandatory=p.mandatory,
        static=p.static,
        label=p.label,
        symbols=p.symbols,
    )


def _point_def(model_id: int, pdef: Mapping[str, Any], name: str, offset: int) -> PointDef:
    ptype = str(pdef[ss_mdef.TYPE])
    size = int(pdef.get(ss_mdef.SIZE) or ss_mb.point_type_info[ptype].len)
    sf = pdef.get(ss_mdef.SF)
    return PointDef(
        model_id=model_id,
        name=name,
        offset=offset,
        size=size,
        type=ptype,
        sf=sf if isinstance(sf, int) else (str(sf) if sf else None),
        units=str(pdef.get(ss_mdef.UNITS) or ""),
        access=str(pdef.get(ss_mdef.ACCESS) or ss_mdef.ACCESS_R),
        mandatory=pdef.get(ss_mdef.MANDATORY) == ss_mdef.MANDATORY_TRUE,
        static=pdef.get(ss_mdef.STATIC) == ss_mdef.STATIC_TRUE,
        label=str(pdef.get(ss_mdef.LABEL) or ""),
        symbols={str(s[ss_mdef.NAME]): int(s[ss_mdef.VALUE]) for s in pdef.get("symbols", [])},
    )


def _flatten(
    model_id: int, gdef: Mapping[str, Any], prefix: str, offset: int, out: dict[str, PointDef]
) -> int:
    """Add the points of a fixed group (and its fixed subgroups) to ``out``; return the offset."""
    sf_names = {str(p[ss_mdef.NAME]) for p in gdef.get(ss_mdef.POINTS, [])}
    for p in gdef.get(ss_mdef.POINTS, []):
        pd = _point_def(model_id, p, prefix + str(p[ss_mdef.NAME]), offset)
        # A scale factor names a point of the same group or of an enclosing one; qualify it
        # so that lookups are by full name.
        if isinstance(pd.sf, str) and prefix and pd.sf in sf_names:
            pd = PointDef(**{**_asdict(pd), "sf": prefix + pd.sf})
        out[pd.name] = pd
        offset += pd.size
    for g in gdef.get(ss_mdef.GROUPS, []):
        count = g.get(ss_mdef.COUNT)
        gname = str(g[ss_mdef.NAME])
        if count is None or count == 1:
            offset = _flatten(model_id, g, f"{prefix}{gname}.", offset, out)
        elif isinstance(count, int) and count > 1:
            for i in range(count):
                offset = _flatten(model_id, g, f"{prefix}{gname}.{i + 1}.", offset, out)
        else:
            raise SunSpecError(f"model {model_id}: group {gname} repeats, but is not last")
    return offset


def _asdict(p: PointDef) -> dict[str, Any]:
    return {k: getattr(p, k) for k in PointDef.__slots__}


def _definition_path(model_id: int) -> str:
    # The definitions shipped inside pysunspec2 (not its search path, which starts at the
    # current directory and would let a stray file override a model).
    return os.path.join(ss_device.models_dir, "json", ss_mdef.to_json_filename(model_id))


@cache
def load_model(model_id: int) -> ModelDef:
    """The definition of SunSpec model ``model_id`` from pysunspec2's JSON files."""
    path = _definition_path(model_id)
    try:
        raw = ss_mdef.from_json_file(path)
    except FileNotFoundError:
        raise SunSpecError(f"model {model_id}: pysunspec2 ships no definition") from None
    gdef = raw[ss_mdef.GROUP]
    groups = list(gdef.get(ss_mdef.GROUPS, []))
    repeating_def = None
    if groups:
        last = groups[-1]
        count = last.get(ss_mdef.COUNT)
        if isinstance(count, str) or count == 0:
            repeating_def = groups.pop()
    fixed: dict[str, PointDef] = {}
    end = _flatten(model_id, {**gdef, ss_mdef.GROUPS: groups}, "", 0, fixed)
    repeating = None
    if repeating_def is not None:
        inst: dict[str, PointDef] = {}
        words = _flatten(model_id, repeating_def, "", 0, inst)
        repeating = _RepeatingGroup(str(repeating_def[ss_mdef.NAME]), words, tuple(inst.values()))
    return ModelDef(
        model_id=model_id,
        name=str(gdef.get(ss_mdef.NAME, "")),
        label=str(gdef.get(ss_mdef.LABEL, "")),
        fixed=fixed,
        fixed_words=end,
        repeating=repeating,
    )


def parse_point_ref(ref: str) -> tuple[int, str]:
    """Split ``"802.SoC"`` into (802, "SoC")."""
    model, _, name = ref.partition(".")
    if not model.isdigit() or not name:
        raise SunSpecError(f"point reference {ref!r}: expected '<model id>.<point name>'")
    return int(model), name


# --------------------------------------------------------------------------------------------
# Point values


@dataclass(frozen=True, slots=True)
class PointValue:
    """A decoded point: ``value`` (scale factor applied) or None with a ``reason``."""

    raw: int | float | str | None
    value: float | str | None
    reason: str = ""

    @property
    def valid(self) -> bool:
        """True when the point holds a usable value."""
        return self.value is not None


def is_not_implemented(pdef: PointDef, raw: int | float | str) -> bool:
    if pdef.type == "float32":
        return isinstance(raw, float) and math.isnan(raw)
    if pdef.type == "string":
        return raw == ""
    if pdef.type == "pad":
        return False
    info = ss_mb.point_type_info.get(pdef.type)
    return info is not None and not info.is_impl(raw)


def decode_point(pdef: PointDef, words: Sequence[int], sf: int | None = None) -> PointValue:
    """Decode a point's words; ``sf`` is the value of its scale-factor point (None if unread).

    Not-implemented markers and NaN give an invalid value with a reason.
    """
    raw = decode_raw(words, pdef.register_type)
    if is_not_implemented(pdef, raw):
        shown = "0x" + "".join(f"{w:04X}" for w in words)
        return PointValue(None, None, f"{pdef.qualified} not implemented ({shown})")
    if isinstance(raw, str):
        return PointValue(raw, raw)
    if isinstance(pdef.sf, int):
        sf = pdef.sf
    elif pdef.sf is not None:
        if sf is None:
            return PointValue(
                raw, None, f"{pdef.qualified}: scale factor {pdef.sf} not implemented"
            )
        if sf not in _SF_RANGE:
            return PointValue(raw, None, f"{pdef.qualified}: scale factor {sf} outside -10..10")
    else:
        sf = 0
    if not sf:
        return PointValue(raw, raw)
    # Dividing by the power of ten keeps decimals exact: 7340 / 100 is 73.4, not 73.40000001.
    return PointValue(raw, raw / 10.0**-sf if sf < 0 else raw * 10.0**sf)


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
        if exp not in _SF_RANGE:
            raise EncodeError(f"{pdef.qualified}: scale factor {exp} outside -10..10")
        if not math.isfinite(value):
            raise EncodeError(f"{pdef.qualified}: {value!r} is not a finite number")
        raw = value / 10.0**exp if pdef.type == "float32" else round(value / 10.0**exp)
    words = encode_raw(raw, rtype)
    # An accumulator's 0 is "not accumulated", a value a writer may legitimately reset to.
    if is_not_implemented(pdef, decode_raw(words, rtype)) and not pdef.type.startswith("acc"):
        raise EncodeError(f"{pdef.qualified}: {value!r} encodes to the not-implemented marker")
    return words


# --------------------------------------------------------------------------------------------
# Discovery


class RegisterEndpoint(Protocol):
    """The transport a SunSpec driver needs (``drivers.modbus.ModbusEndpoint`` provides it).

    Raise ``CommunicationError`` when nothing answers and ``DeviceExceptionResponse`` for a
    Modbus exception. The driver also uses, when the endpoint has them, ``async connect()``,
    ``async close()`` (only with ``owns_endpoint``) and ``note_readback_mismatch(unit)``.
    """

    async def read_registers(self, table: Table, address: int, count: int, unit: int) -> list[int]:
        """Read ``count`` registers of ``table`` from ``address``."""
        ...

    async def write_registers(self, address: int, values: Sequence[int], unit: int) -> None:
        """Write holding registers from ``address``."""
        ...


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    """A model found on the device: id, address of its ID register, and length ``L``."""

    model_id: int
    address: int
    length: int

    @property
    def end(self) -> int:
        """The first address after the model."""
        return self.address + 2 + self.length

    @property
    def definition(self) -> ModelDef:
        """The model's definition (SunSpecError when pysunspec2 has none)."""
        return load_model(self.model_id)


@dataclass(frozen=True, slots=True)
class SunSpecMap:
    """A device's SunSpec register map: base address and models in device order."""

    base_address: int
    models: tuple[DiscoveredModel, ...]

    @property
    def model_ids(self) -> tuple[int, ...]:
        """Model ids in device order."""
        return tuple(m.model_id for m in self.models)

    def model(self, model_id: int) -> DiscoveredModel:
        """The first instance of ``model_id`` (SunSpecError when the device has none)."""
        for m in self.models:
            if m.model_id == model_id:
                return m
        raise SunSpecDiscoveryError(
            f"model {model_id} not found (device has {', '.join(map(str, self.model_ids))})"
        )

    def require(self, model_ids: Iterable[int], device: str) -> None:
        """Raise SunSpecDiscoveryError naming every model in ``model_ids`` the device lacks."""
        missing = [m for m in dict.fromkeys(model_ids) if m not in self.model_ids]
        if missing:
            raise SunSpecDiscoveryError(
                f"{device}: SunSpec model(s) {', '.join(map(str, missing))} required by the "
                f"profile not found at base {self.base_address} (device has "
                f"{', '.join(map(str, self.model_ids)) or 'none'})"
            )

    def locate(self, ref: str) -> tuple[DiscoveredModel, PointDef, int]:
        """Model, point and absolute address of ``"<model>.<point>"``."""
        mid, name = parse_point_ref(ref)
        m = self.model(mid)
        pdef = m.definition.point(name, m.length)
        return m, pdef, m.address + pdef.offset


async def discover(
    endpoint: RegisterEndpoint,
    *,
    unit: int,
    base_addresses: Sequence[int] = (40000, 0, 50000),
    device: str = "device",
) -> SunSpecMap:
    """Find the "SunS" marker at the first base address that has it, then walk the models.

    Raises SunSpecDiscoveryError when no base address carries the marker or the chain is
    malformed; CommunicationError when the device answers at none of them.
    """
    tried: list[str] = []
    silent = 0
    for base in base_addresses:
        try:
            words = await endpoint.read_registers(Table.HOLDING, base, 2, unit)
        except DeviceExceptionResponse as exc:
            tried.append(f"{base}: exception {exc.code}")
            continue
        except CommunicationError as exc:
            silent += 1
            tried.append(f"{base}: {exc}")
            continue
        if tuple(words) == SUNS_MARKER:
            return await _walk(endpoint, unit, base, device)
        tried.append(f"{base}: no marker ({' '.join(f'0x{w:04X}' for w in words)})")
    if silent == len(base_addresses):
        raise CommunicationError(f"{device}: no answer at any SunSpec base ({'; '.join(tried)})")
    raise SunSpecDiscoveryError(f"{device}: no SunSpec 'SunS' marker ({'; '.join(tried)})")


async def _walk(endpoint: RegisterEndpoint, unit: int, base: int, device: str) -> SunSpecMap:
    models: list[DiscoveredModel] = []
    addr = base + 2
    while True:
        if len(models) >= _MAX_MODELS:
            raise SunSpecDiscoveryError(f"{device}: more than {_MAX_MODELS} models from {base}")
        if addr + 1 > 0xFFFF:
            raise SunSpecDiscoveryError(f"{device}: model chain runs past 65535 (no end model)")
        # The id alone first: some devices do not answer a length register after the end model.
        (model_id,) = await endpoint.read_registers(Table.HOLDING, addr, 1, unit)
        if model_id == END_MODEL_ID:
            return SunSpecMap(base, tuple(models))
        (length,) = await endpoint.read_registers(Table.HOLDING, addr + 1, 1, unit)
        found = DiscoveredModel(model_id, addr, length)
        try:
            found.definition.repeats_for(length)
        except SunSpecError as exc:
            # A model without a pysunspec2 definition is skipped, as pysunspec2 does; a
            # known model whose length disagrees with its definition is an error.
            if "ships no definition" not in str(exc):
                raise SunSpecDiscoveryError(f"{device}: at {addr}: {exc}") from None
        models.append(found)
        addr = found.end


# --------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True, slots=True)
class _Bound:
    spec: RegisterSpec
    model_id: int
    point_name: str


class SunSpecDriver(ProfileDriver):
    """A profile-driven driver for a SunSpec device (``driver: sunspec`` profiles).

    Registers of the profile name points (``point: "802.SoC"``); discovery locates them, the
    model definitions type them, and each control action of the profile is executed as its
    register writes, every one read back. Battery power: > 0 discharges into the site, < 0
    charges. Constructing ``SunSpecDriver(...)`` returns an instance of a subclass that has
    exactly the capability methods the profile declares, so ``isinstance(driver,
    ActivePowerControl)`` answers what the device can do.

    Readings are the profile register's value ``* scale + offset`` after the SunSpec scale
    factor. Live limits: the ratings, then the ``max_charge_w`` / ``max_discharge_w`` fields
    (a declared limit that reads invalid counts as 0 W: held idle in that direction until the
    BMS reports again), tightened by the BMS's instantaneous current limits times the DC
    voltage when the profile maps ``max_charge_a`` / ``max_discharge_a`` and ``dc_voltage_v``
    (802 AChaMax/ADisChaMax x V), then by ``limits_override`` from the site config.
    Alarms: every set bit of a bitfield mapped to a field whose name starts with ``alarm`` or
    ``fault``, named by the model's symbol, and ``<point>=FAULT`` for an enumeration field
    ``state`` holding a FAULT symbol.
    """

    _compose_root = True
    # Arguments go unchecked here: each point's profile min/max (and the SunSpec encoding)
    # refuses a value that does not fit, naming the register.
    _check_arguments = False

    def __init__(  # noqa: PLR0917 - the driver factory may build drivers positionally
        self,
        device_id: str,
        profile: Profile,
        endpoint: RegisterEndpoint,
        unit: int | None = None,
        clock: Clock | None = None,
        limits_override: LiveLimits | None = None,
        *,
        capacity_wh: float | None = None,
        owns_endpoint: bool = False,
    ) -> None:
        if profile.driver != "sunspec" or profile.sunspec is None:
            raise ProfileError(f"profile {profile.name}: driver is {profile.driver!r}, not sunspec")
        if clock is None:
            raise TypeError("clock: required")
        self._init_identity(
            device_id=device_id,
            profile=profile,
            unit=unit,
            clock=clock,
            limits_override=limits_override,
            capacity_wh=capacity_wh,
            owns_endpoint=owns_endpoint,
        )
        self._endpoint = endpoint
        self._bound: dict[str, _Bound] = {}
        for spec in profile.registers:
            where = f"profile {profile.name}: registers.{spec.name}"
            if spec.point is None:
                raise ProfileError(f"{where}.address: a sunspec profile maps points only")
            if spec.scale_factor is not None:
                raise ProfileError(f"{where}.scale_factor: SunSpec points carry their own")
            mid, name = parse_point_ref(spec.point)
            if mid not in profile.sunspec.models:
                raise ProfileError(f"{where}.point: model {mid} is not in sunspec.models")
            try:
                load_model(mid).point(name)
            except SunSpecError as exc:
                raise ProfileError(f"{where}.point: {exc}") from None
            self._bound[spec.name] = _Bound(spec, mid, name)
        self._field_of = {reg: f for f, reg in profile.fields.items()}
        self._map: SunSpecMap | None = None
        self._sf: dict[str, int | None] = {}  # "<model>.<sf point>" -> last value read

    # -- identity ------------------------------------------------------------------------------

    @property
    def sunspec_map(self) -> SunSpecMap | None:
        """The discovered map (None before :meth:`connect` or after the map moved)."""
        return self._map

    # -- lifetime ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the transport, discover the SunSpec map and check the profile's models are there.

        Raises SunSpecDiscoveryError naming the missing models, CommunicationError when the
        device does not answer.
        """
        connect = getattr(self._endpoint, "connect", None)
        if connect is not None:
            await connect()
        if self._map is not None:
            return
        assert self._profile.sunspec is not None  # checked in __init__
        found = await discover(
            self._endpoint,
            unit=self._unit,
            base_addresses=self._profile.sunspec.base_addresses,
            device=self._device_id,
        )
        found.require(self._profile.sunspec.models, self._device_id)
        self._map = found

    async def close(self) -> None:
        """Forget the map; close the transport when this driver owns it."""
        self._map = None
        self._sf.clear()
        close = getattr(self._endpoint, "close", None)
        if self._owns_endpoint and close is not None:
            await close()

    # -- reading -------------------------------------------------------------------------------

    async def _ensure_map(self) -> SunSpecMap:
        if self._map is None:
            await self.connect()
        assert self._map is not None
        return self._map

    async def _read_block(self, address: int, count: int) -> list[int]:
        step = self._profile.transport.max_registers_per_read
        words: list[int] = []
        for a in range(address, address + count, step):
            n = min(step, address + count - a)
            words += await self._endpoint.read_registers(Table.HOLDING, a, n, self._unit)
        return words

    async def read_points(self) -> dict[str, PointValue]:
        """Read every model the profile maps (one block each) and decode each register."""
        smap = await self._ensure_map()
        values: dict[str, PointValue] = {}
        for mid in dict.fromkeys(b.model_id for b in self._bound.values()):
            m = smap.model(mid)
            try:
                words = await self._read_block(m.address, m.length + 2)
            except DeviceExceptionResponse:
                self._map = None  # an address the device no longer has: rediscover next time
                raise
            if words[0] != mid:
                # The map moved (firmware update, unit swapped): rediscover on the next call.
                self._map = None
                raise SunSpecDiscoveryError(
                    f"{self._device_id}: model {mid} expected at {m.address}, found id {words[0]}"
                )
            points = m.definition.points(m.length)
            for p in points.values():
                if p.type == "sunssf":
                    v = decode_raw(words[p.offset : p.offset + 1], RegisterType.S16)
                    self._sf[p.qualified] = None if is_not_implemented(p, v) else int(v)
            for b in self._bound.values():
                if b.model_id == mid:
                    p = points[b.point_name]
                    sf = self._sf.get(f"{mid}.{p.sf}") if isinstance(p.sf, str) else None
                    values[b.spec.name] = decode_point(p, words[p.offset : p.offset + p.size], sf)
        return values

    @staticmethod
    def _reading(spec: RegisterSpec, pv: PointValue, at: float) -> Reading:
        """A register's reading in essd base units (``%`` -> ratio, ``kW`` -> W ...)."""
        unit = base_unit(spec.unit)
        if not pv.valid:
            return Reading.bad(unit, at, Quality.INVALID, pv.reason)
        if not isinstance(pv.value, int | float):
            return Reading.bad(unit, at, Quality.INVALID, f"{spec.name}: text, not a number")
        if isinstance(pv.raw, int) and pv.raw in spec.not_implemented:
            return Reading.bad(unit, at, Quality.INVALID, f"{spec.name}: not implemented")
        value = float(pv.value) * spec.scale + spec.offset
        if (spec.min is not None and value < spec.min) or (
            spec.max is not None and value > spec.max
        ):
            return Reading.bad(
                unit,
                at,
                Quality.INVALID,
                f"{spec.name}: {value:g} outside [{spec.min}, {spec.max}]",
            )
        return Reading.good(to_base(value, spec.unit), unit, at)

    def _fields(self, by_register: Mapping[str, Reading], at: float) -> dict[str, Reading]:
        """Every field of the profile, derived fields (weighted sums) included."""
        out = {f: by_register[reg] for f, reg in self._profile.fields.items()}
        self._add_derived(out, at)
        return out

    async def read_fields(self) -> dict[str, Reading]:
        """Every field of the profile as a reading in base units (invalid ones with a reason)."""
        values = await self.read_points()
        at = self._clock.monotonic()
        by_register = {n: self._reading(self._bound[n].spec, pv, at) for n, pv in values.items()}
        return self._fields(by_register, at)

    def counters(self) -> DeviceCounters:
        """Cumulative communication counters of this device (from its Modbus endpoint)."""
        if isinstance(self._endpoint, ModbusEndpoint):
            return self._endpoint.stats(self._unit).to_device_counters()
        return DeviceCounters()

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], tuple[str, ...]]:
        values = await self.read_points()
        at = self._clock.monotonic()
        by_register = {n: self._reading(self._bound[n].spec, pv, at) for n, pv in values.items()}
        fields = self._fields(by_register, at)
        # Every register read goes out, named by its field where it has one.
        extras = {self._field_of.get(n, n): r for n, r in by_register.items()}
        extras.update({d: fields[d] for d in self._profile.derived})
        return at, fields, extras, self._alarms(values)

    def _bms_limits(self, fields: Mapping[str, Reading]) -> LiveLimits:
        """The W live-limit fields, tightened by the BMS's current limits when mapped.

        The schema makes a live_limits profile map both W fields; current limits are optional
        and tighten them (P = I x V at the DC bus). An invalid limit counts as 0 W.
        """
        volts = live_limit_w(fields, "dc_voltage_v")
        per_direction: list[float] = []
        for direction in ("charge", "discharge"):
            candidates = [live_limit_w(fields, f"max_{direction}_w") or 0.0]
            amps = live_limit_w(fields, f"max_{direction}_a")
            if amps is not None and volts is not None:
                candidates.append(amps * volts)
            per_direction.append(min(candidates))
        return LiveLimits(per_direction[0], per_direction[1])

    def _alarms(self, values: Mapping[str, PointValue]) -> tuple[str, ...]:
        alarms: list[str] = []
        for fname, reg in self._profile.fields.items():
            b = self._bound[reg]
            pdef = load_model(b.model_id).point(b.point_name)
            pv = values.get(reg)
            if pv is None or not pv.valid or not isinstance(pv.raw, int):
                continue
            if fname.startswith(("alarm", "fault")) and pdef.type in _BITFIELDS:
                for bit in range(pdef.size * 16):
                    if pv.raw >> bit & 1:
                        alarms.append(pdef.symbol_name(bit) or f"{pdef.qualified} bit {bit}")
            elif (
                fname == "state" and pdef.type in ENUM_TYPES and pdef.symbol_name(pv.raw) == "FAULT"
            ):
                alarms.append(f"{pdef.qualified}=FAULT")
        return tuple(alarms)

    # -- writing -------------------------------------------------------------------------------

    async def _sf_value(self, m: DiscoveredModel, pdef: PointDef) -> int | None:
        if not isinstance(pdef.sf, str):
            return pdef.sf
        key = f"{m.model_id}.{pdef.sf}"
        if key not in self._sf:
            sfp = m.definition.point(pdef.sf, m.length)
            words = await self._endpoint.read_registers(
                Table.HOLDING, m.address + sfp.offset, 1, self._unit
            )
            v = decode_raw(words, RegisterType.S16)
            self._sf[key] = None if is_not_implemented(sfp, v) else int(v)
        return self._sf[key]

    def _point_value(
        self, spec: RegisterSpec, param: str | None, value: float | str
    ) -> float | str:
        """A step's value as the point's physical value (range checked).

        A parameter arrives in essd base units (W, s, ratio) and is converted to the
        register's unit; a literal ``value`` is in the register's unit already.
        """
        if isinstance(value, str):
            return value
        if param is not None:
            value = from_base(value, spec.unit)
        if (spec.min is not None and value < spec.min) or (
            spec.max is not None and value > spec.max
        ):
            raise ValueRefused(
                f"{self._device_id}: {spec.name} = {value:g} outside [{spec.min}, {spec.max}]"
            )
        if param in TIME_PARAMS:  # rounded up: a 30.2 s TTL becomes 31 s
            value = math.ceil(value - 1e-9)
        return (value - spec.offset) / spec.scale

    def _check_write_scale(
        self, action: ActionName, spec: RegisterSpec, param: str | None, sf: int | None
    ) -> None:
        """ValueRefused when the device's scale factor cannot carry this write (SF 15 rounds
        every setpoint to raw 0; a raw step over 1 % of the rating is no control)."""
        if sf is None:
            return
        problem = f"scale factor {sf} outside -10..10" if sf not in _SF_RANGE else None
        if problem is None:
            step_w = abs(to_base(spec.scale * 10.0**sf, spec.unit))
            for rating in self._profile.power_ratings(param):
                problem = problem or resolution_problem(step_w, abs(rating))
        if problem is not None:
            raise ValueRefused(f"{self._device_id}: {action}: {spec.name}: {problem}")

    async def run_action(
        self, action: ActionName, params: Mapping[str, float] | None = None
    ) -> WriteResult:
        """Execute a profile action as its ordered register writes, each read back.

        Every value is encoded before the first write, so a bad value (ValueRefused) leaves
        nothing half done. ``when`` steps follow the sign of ``params["power_w"]``.
        """
        act = self._profile.actions.get(action)
        if act is None:
            raise ValueRefused(f"{self._device_id}: profile {self._profile.name} has no {action}")
        smap = await self._ensure_map()
        params = dict(params or {})
        power = params.get("power_w", 0.0)
        sense = "charge" if power < 0 else "discharge" if power > 0 else "idle"
        planned: list[tuple[RegisterSpec, PointDef, int, list[int], int | None]] = []
        for step in act.writes:
            if step.when not in ("always", sense):
                continue
            b = self._bound[step.register]
            if step.param is not None:
                if step.param not in params:
                    raise ValueRefused(f"{action}: parameter {step.param!r} not supplied")
                raw_value: float | str = params[step.param]
            else:
                assert step.value is not None  # the schema requires value or param
                raw_value = step.value
            value = self._point_value(b.spec, step.param, raw_value)
            m, pdef, address = smap.locate(f"{b.model_id}.{b.point_name}")
            sf = await self._sf_value(m, pdef)
            self._check_write_scale(action, b.spec, step.param, sf)
            try:
                words = encode_point(pdef, value, sf)
            except (EncodeError, SunSpecError) as exc:
                raise ValueRefused(f"{self._device_id}: {action}: {b.spec.name}: {exc}") from None
            planned.append((b.spec, pdef, address, words, sf))
        for _, _, address, words, _ in planned:
            await self._endpoint.write_registers(address, words, self._unit)
        mismatches: list[str] = []
        for spec, pdef, address, words, sf in planned:
            if not spec.verify:
                continue  # a trigger register the device clears itself
            back = await self._endpoint.read_registers(
                Table.HOLDING, address, len(words), self._unit
            )
            if list(back) != words:
                note = getattr(self._endpoint, "note_readback_mismatch", None)
                if note is not None:
                    note(self._unit)
                want = decode_point(pdef, words, sf)
                got = decode_point(pdef, back, sf)
                mismatches.append(
                    f"{spec.name} ({pdef.qualified}): wrote {want.value!r}, read back "
                    f"{got.value if got.valid else got.reason!r}"
                )
        return WriteResult(action.value, len(planned), tuple(mismatches))

    async def _run_action(
        self, action: ActionName, params: Mapping[str, float] | None, when: Sense
    ) -> WriteResult:
        # run_action takes the sense from params["power_w"], which set_active_power supplies.
        del when
        return await self.run_action(action, params)

    def _heartbeat_after(self, previous: int) -> int:
        """1, 2, ... wrapping below the 0xFFFF "not implemented" marker."""
        return previous % 0xFFFE + 1
