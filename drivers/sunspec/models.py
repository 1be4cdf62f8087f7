"""SunSpec model definitions, loaded from the JSON files pysunspec2 ships
(``sunspec2/models/json/model_<id>.json``) with its own loader: every point's offset, type,
size, scale-factor point, units, access, enumeration and bitfield symbols. No offset is typed
by hand, so the driver and the simulator image read one source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from sunspec2 import device as ss_device
from sunspec2 import mb as ss_mb
from sunspec2 import mdef as ss_mdef

from drivers.api import DeviceError
from drivers.registers import RegisterType

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


BITFIELD_TYPES = frozenset({"bitfield16", "bitfield32"})


ENUM_TYPES = frozenset({"enum16", "enum32"})


class SunSpecError(DeviceError):
    """A SunSpec-level problem: unknown model or point, value that cannot be encoded."""


class SunSpecDiscoveryError(SunSpecError):
    """No SunSpec map found, a malformed model chain, or a model the profile needs is missing."""


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
                    out[name] = replace(p, name=name, offset=base + p.offset)
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
                return replace(p, name=name, offset=offset)
        return None


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
