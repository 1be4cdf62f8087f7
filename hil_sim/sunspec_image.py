"""The simulator's SunSpec register map, laid out from the same pysunspec2 model definitions
the driver (:mod:`drivers.sunspec`) reads, so the two cannot drift apart.

Units: points in their physical units (scale factor applied); profile registers in the
profile's units; semantic fields in essd base units (W, Wh, s, ratio 0..1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from drivers.profile import Profile, ProfileError, RegisterSpec
from drivers.registers import EncodeError, RegisterType, Table, decode_raw, encode_raw
from drivers.sunspec import (
    SUNS_MARKER,
    DiscoveredModel,
    ModelDef,
    PointDef,
    SunSpecError,
    SunSpecMap,
    decode_point,
    encode_point,
    load_model,
)
from drivers.sunspec.codec import is_not_implemented
from drivers.sunspec.discovery import END_MODEL_ID
from drivers.sunspec.models import ENUM_TYPES
from hil_sim.profile_image import FieldAccess
from hil_sim.store import ModbusExceptionCode, RegisterAccessError, RegisterImage

_UNIT_MAGNITUDE = {"%": 100.0, "pct": 100.0, "v": 1000.0, "hz": 70.0, "secs": 0.0}


class SunSpecImage(FieldAccess):
    """A SunSpec register map in memory, implementing :class:`~hil_sim.store.RegisterStore`.

    Points are addressed as ``"<model>.<point>"``; :meth:`set_point` / :meth:`get_point` work
    in physical units (the point's scale factor applied), :meth:`set_value` /
    :meth:`get_value` in the profile's units (its ``scale`` and ``offset`` applied too).
    Writes from a client go only to read-write points; listeners hear which points changed.
    """

    def __init__(self, profile: Profile, sunspec_map: SunSpecMap, image: RegisterImage) -> None:
        self._profile = profile
        self.map = sunspec_map
        self._image = image
        self._owner: dict[int, PointDef] = {}  # address -> point covering it
        for m in sunspec_map.models:
            for p in m.definition.points(m.length).values():
                for a in range(m.address + p.offset, m.address + p.offset + p.size):
                    self._owner[a] = p
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []
        # Where each point and scale factor is in the map (which never changes), found once.
        self._located: dict[str, tuple[DiscoveredModel, PointDef, int]] = {}
        self._sf_points: dict[tuple[int, str], PointDef] = {}

    @property
    def profile(self) -> Profile:
        """The profile the image was built from."""
        return self._profile

    @property
    def base_address(self) -> int:
        """Where the "SunS" marker sits."""
        return self.map.base_address

    def add_write_listener(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``callback(points)`` after each client write, with the qualified point names."""
        self._listeners.append(callback)

    # RegisterStore

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Holding registers only, as SunSpec defines; others answer ILLEGAL_DATA_ADDRESS."""
        return self._image.read(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        """A client write: read-write points only, enumerations checked against their symbols."""
        touched: dict[str, PointDef] = {}
        for a in range(address, address + len(values)):
            p = self._owner.get(a)
            if p is None or not p.writable:
                raise RegisterAccessError(
                    ModbusExceptionCode.ILLEGAL_DATA_ADDRESS, f"register {a} is not writable"
                )
            touched[p.qualified] = p
        old = {
            a: self._image.get(Table.HOLDING, a, 1)[0]
            for a in range(address, address + len(values))
        }
        self._image.write(address, values)
        for p in touched.values():
            if p.type in ENUM_TYPES and p.symbols:
                m = self.map.model(p.model_id)
                words = self._image.get(Table.HOLDING, m.address + p.offset, p.size)
                raw = decode_raw(words, p.register_type)
                if raw not in p.symbols.values() and not is_not_implemented(p, raw):
                    for a, w in old.items():
                        self._image.set(Table.HOLDING, a, [w])
                    raise RegisterAccessError(
                        ModbusExceptionCode.ILLEGAL_DATA_VALUE, f"{p.qualified}: {raw} not allowed"
                    )
        names = tuple(touched)
        for cb in self._listeners:
            cb(names)

    # Points

    def _locate(self, name: str) -> tuple[DiscoveredModel, PointDef, int]:
        found = self._located.get(name)
        if found is None:
            try:
                found = self._located[name] = self.map.locate(name)
            except SunSpecError as exc:
                raise KeyError(str(exc)) from None
        return found

    def _sf(self, m: DiscoveredModel, pdef: PointDef) -> int | None:
        if not isinstance(pdef.sf, str):
            return pdef.sf
        key = (m.address, pdef.sf)
        sfp = self._sf_points.get(key)
        if sfp is None:
            sfp = self._sf_points[key] = m.definition.point(pdef.sf, m.length)
        v = decode_raw(self._image.get(Table.HOLDING, m.address + sfp.offset, 1), RegisterType.S16)
        return None if is_not_implemented(sfp, v) else int(v)

    def set_point_words(self, name: str, words: Sequence[int]) -> None:
        """Set a point's words as they are (e.g. a not-implemented marker)."""
        _, p, address = self._locate(name)
        if len(words) != p.size:
            raise ValueError(f"{name}: needs {p.size} words, got {len(words)}")
        self._image.set(Table.HOLDING, address, list(words))

    def get_point_words(self, name: str) -> list[int]:
        """A point's words."""
        _, p, address = self._locate(name)
        return self._image.get(Table.HOLDING, address, p.size)

    def set_point(self, name: str, value: float | str | None) -> None:
        """Set ``"<model>.<point>"`` to a physical value (None: the not-implemented marker)."""
        m, p, address = self._locate(name)
        self._image.set(Table.HOLDING, address, encode_point(p, value, self._sf(m, p)))

    def get_point(self, name: str) -> float | str | None:
        """A point's physical value (None when not implemented)."""
        m, p, address = self._locate(name)
        words = self._image.get(Table.HOLDING, address, p.size)
        return decode_point(p, words, self._sf(m, p)).value

    # Named access by profile register and semantic field, with the same names as the plain
    # profiles' image (hil_sim.profile_image.ProfileImage), so the simulator drives both alike.

    def spec(self, name: str) -> RegisterSpec:
        """The profile register called ``name`` (KeyError naming it otherwise)."""
        spec = self._profile.register(name)
        if spec.point is None:
            raise KeyError(f"register {name}: not a SunSpec point")
        return spec

    def names(self) -> Iterable[str]:
        """Names of every register of the profile."""
        return [r.name for r in self._profile.registers]

    def get_raw(self, name: str) -> int | float | str:
        """A register's raw (unscaled) value."""
        _, p, _ = self._locate(str(self.spec(name).point))
        return decode_raw(self.get_point_words(p.qualified), p.register_type)

    def set_raw(self, name: str, raw: int | float | str) -> None:
        """Set a register's raw value (e.g. 0xFFFF "not implemented" or NaN for fault tests)."""
        _, p, _ = self._locate(str(self.spec(name).point))
        words = encode_raw(raw, p.register_type, string_words=p.size)
        self.set_point_words(p.qualified, words)

    def set_value(self, name: str, value: float | str | None, *, check_range: bool = True) -> None:
        """Set a register in the profile's units (its scale and offset applied).

        With ``check_range`` a value outside the register's min/max raises EncodeError.
        """
        spec = self.spec(name)
        if isinstance(value, float | int):
            if check_range and (
                (spec.min is not None and value < spec.min)
                or (spec.max is not None and value > spec.max)
            ):
                raise EncodeError(f"{name}: {value!r} outside [{spec.min}, {spec.max}]")
            value = (value - spec.offset) / spec.scale
        self.set_point(str(spec.point), value)

    def get_value(self, name: str) -> float | str | None:
        """A register in the profile's units (None when not implemented)."""
        spec = self.spec(name)
        v = self.get_point(str(spec.point))
        return v * spec.scale + spec.offset if isinstance(v, float | int) else v


# Without ratings (a meter) the image assumes a 200 kW connection point.
_DEFAULT_POWER_W = 200_000.0
# Energy counters (acc32/acc64) are sized for 1 GWh, a year of a large site.
_COUNTER_WH = 1e9


def _magnitude(p: PointDef, profile: Profile) -> float:
    """The largest physical value a point of this image is expected to hold."""
    r = profile.ratings
    power = max(r.max_charge_w, r.max_discharge_w) or _DEFAULT_POWER_W
    u = p.units.lower().replace(" ", "")
    if p.type.startswith("acc"):
        return _COUNTER_WH
    if u.startswith(("w", "va", "var")) and "h" not in u and "/" not in u:
        return power * 1.5
    if u.startswith(("wh", "vah", "varh")):
        return max(r.capacity_wh, 1.0) * 1.5
    if u.startswith("a"):
        return power / 100.0  # current at a 100 V DC bus or more
    return next((v for k, v in _UNIT_MAGNITUDE.items() if u.startswith(k)), 100.0)


def _type_limit(p: PointDef) -> float:
    return {"int16": 32767.0, "uint16": 65534.0}.get(p.type, 2.0**31 - 1)


def _auto_sf(definition: ModelDef, sf_name: str, profile: Profile) -> int:
    """The finest scale factor (-2 at most) at which every point using ``sf_name`` fits."""
    users = [p for p in definition.fixed.values() if p.sf == sf_name]
    if not users:
        return 0
    need = max(_magnitude(p, profile) for p in users)
    limit = min(_type_limit(p) for p in users)
    return next((sf for sf in range(-2, 7) if need / 10.0**sf <= limit), 6)


def _initial_words(
    m: DiscoveredModel, p: PointDef, profile: Profile, overrides: dict[str, int], mapped: set[str]
) -> list[int]:
    """What a point of a freshly built image holds (see :func:`build_sunspec_image`)."""
    if p.name in ("ID", "L"):
        return [m.model_id if p.name == "ID" else m.length]
    if p.type == "sunssf":
        sf = overrides.pop(p.qualified, None)
        if sf is None:
            sf = _auto_sf(m.definition, p.name, profile)
        return encode_raw(sf, RegisterType.S16)
    if p.type in ("pad", "string") and (p.type == "pad" or p.qualified in mapped or p.mandatory):
        return [0] * p.size
    if p.qualified in mapped or p.mandatory:
        first = min(p.symbols.values()) if p.type in ENUM_TYPES and p.symbols else 0
        return encode_raw(first, p.register_type)
    return encode_point(p, None)


def build_sunspec_image(
    profile: Profile,
    *,
    base_address: int | None = None,
    scale_factors: Mapping[str, int] | None = None,
    repeats: Mapping[int, int] | None = None,
    serial_number: str = "SIM-0001",
    unit: int | None = None,
) -> SunSpecImage:
    """Lay out the profile's SunSpec models in register space, from the same definitions.

    The "SunS" marker sits at ``base_address`` (default: the profile's first base address),
    then each model of ``profile.sunspec.models`` in order, then the end model. Points the
    profile maps and mandatory points start at 0 (enumerations at their first symbol); others
    hold the not-implemented marker. Scale factors default to the finest value at which the
    profile's ratings fit; ``scale_factors`` (``{"802.W_SF": 1}``) overrides them.
    ``repeats`` gives the instances of a model's repeating group (``{160: 2}``; at least those
    the profile's points name); ``unit``
    (default: the profile's) is model 1's device address.
    """
    if profile.sunspec is None:
        raise ProfileError(f"profile {profile.name}: sunspec: required to build a SunSpec image")
    base = profile.sunspec.base_addresses[0] if base_address is None else base_address
    # At least as many repeating-group instances as the profile's points name
    # ("160.module.4.DCW" needs four modules).
    instances = dict(repeats or {})
    for r in profile.registers:
        parts = (r.point or "").split(".")
        if len(parts) == 4 and parts[0].isdigit() and parts[2].isdigit():
            mid_, n = int(parts[0]), int(parts[2])
            instances[mid_] = max(instances.get(mid_, 0), n)
    models: list[DiscoveredModel] = []
    addr = base + 2
    for mid in profile.sunspec.models:
        definition = load_model(mid)
        length = definition.length_for(instances.get(mid, 0))
        models.append(DiscoveredModel(mid, addr, length))
        addr += length + 2
    if addr + 2 > 0x10000:
        raise ProfileError(f"profile {profile.name}: sunspec: models run past register 65535")
    smap = SunSpecMap(base, tuple(models))
    image = RegisterImage()
    image.define(Table.HOLDING, base, addr + 2 - base)
    image.set(Table.HOLDING, base, list(SUNS_MARKER))
    image.set(Table.HOLDING, addr, [END_MODEL_ID, 0])
    mapped = {r.point for r in profile.registers if r.point is not None}
    overrides = dict(scale_factors or {})
    for m in models:
        for p in m.definition.points(m.length).values():
            words = _initial_words(m, p, profile, overrides, mapped)
            image.set(Table.HOLDING, m.address + p.offset, words)
    if overrides:
        raise KeyError(f"scale_factors: no sunssf point(s) {', '.join(sorted(overrides))}")
    result = SunSpecImage(profile, smap, image)
    if 1 in profile.sunspec.models:
        result.set_point("1.Mn", "essd-sim")
        result.set_point("1.Md", profile.name[:32])
        result.set_point("1.SN", serial_number)
        result.set_point("1.Vr", "1")
        result.set_point("1.DA", profile.transport.unit if unit is None else unit)
    return result
