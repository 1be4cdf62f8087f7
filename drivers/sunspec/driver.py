"""The profile-driven SunSpec driver: reads and writes the points a profile maps, after discovery.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.api import DeviceExceptionResponse, ValueRefused
from drivers.base import ProfileDriver, live_limit_w
from drivers.derive import add_derived
from drivers.engine import Point
from drivers.layout import SF_RANGE, Decoded, base_unit, resolution_problem, to_base
from drivers.profile import ActionName, ProfileError, RegisterSpec
from drivers.registers import EncodeError, RegisterType, Table, decode_raw
from drivers.states import DeviceStates, sort_states
from drivers.sunspec.codec import decode_point, encode_point, is_not_implemented
from drivers.sunspec.discovery import DiscoveredModel, SunSpecMap, discover
from drivers.sunspec.models import (
    BITFIELD_TYPES,
    ENUM_TYPES,
    PointDef,
    SunSpecDiscoveryError,
    SunSpecError,
    load_model,
    parse_point_ref,
)
from essd.domain import LiveLimits, Quality, Reading


@dataclass(frozen=True, slots=True)
class _Bound:
    spec: RegisterSpec
    model_id: int
    point_name: str


class SunSpecDriver(ProfileDriver):
    """A profile-driven driver for a SunSpec device (``driver: sunspec`` profiles).

    Registers of the profile name points (``point: "802.SoC"``); discovery locates them, the
    model definitions type them, and the action engine (:mod:`drivers.engine`) runs each
    control action with this driver as the codec of its points. Battery power: > 0 discharges
    into the site, < 0 charges.

    Readings are the profile register's value ``* scale + offset`` after the SunSpec scale
    factor. Live limits: the ratings, then the ``max_charge_w`` / ``max_discharge_w`` fields
    (a declared limit that reads invalid counts as 0 W: held idle in that direction until the
    BMS reports again), tightened by the BMS's instantaneous current limits times the DC
    voltage when the profile maps ``max_charge_a`` / ``max_discharge_a`` and ``dc_voltage_v``
    (802 AChaMax/ADisChaMax x V), then by ``limits_override`` from the site config.
    Alarms: every set bit of a bitfield mapped to a field whose name starts with ``alarm`` or
    ``fault``, named by the model's symbol, and ``<point>=FAULT`` for an enumeration field
    ``state`` holding a FAULT symbol.

    Consecutive points an action writes go as one function-16 request: the SunSpec Modbus
    specification requires devices to support "write multiple registers" (16).
    """

    merge_writes = True

    def _bind(self) -> None:
        profile = self._profile
        if profile.driver != "sunspec" or profile.sunspec is None:
            raise ProfileError(f"profile {profile.name}: driver is {profile.driver!r}, not sunspec")
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
        await super().connect()
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
        await super().close()

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

    async def read_points(self) -> dict[str, Decoded]:
        """Read every model the profile maps and decode each register.

        Models that follow one another in the map are read together, up to
        ``max_registers_per_read`` a request (a SunSpec map is one run of model blocks, each
        answered whole): the example PCS's four models are two requests, not four.
        """
        smap = await self._ensure_map()
        step = self._profile.transport.max_registers_per_read
        models = sorted(
            (smap.model(mid) for mid in dict.fromkeys(b.model_id for b in self._bound.values())),
            key=lambda m: m.address,
        )
        runs: list[list[DiscoveredModel]] = []
        for m in models:
            last = runs[-1] if runs else None
            follows = last is not None and m.address == last[-1].address + last[-1].length + 2
            if last and follows and m.address + m.length + 2 - last[0].address <= step:
                last.append(m)
                continue
            runs.append([m])
        values: dict[str, Decoded] = {}
        for run in runs:
            start = run[0].address
            try:
                words = await self._read_block(start, run[-1].address + run[-1].length + 2 - start)
            except DeviceExceptionResponse:
                self._map = None  # an address the device no longer has: rediscover next time
                raise
            for m in run:
                at = m.address - start
                self._decode_model(m, words[at : at + m.length + 2], values)
        return values

    def _decode_model(
        self, m: DiscoveredModel, words: list[int], values: dict[str, Decoded]
    ) -> None:
        """The bound points of model ``m`` from its block ``words``, into ``values``."""
        mid = m.model_id
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

    @staticmethod
    def _reading(spec: RegisterSpec, pv: Decoded, at: float) -> Reading:
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

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], DeviceStates]:
        values = await self.read_points()
        at = self._clock.monotonic()
        by_register = {n: self._reading(self._bound[n].spec, pv, at) for n, pv in values.items()}
        fields = {f: by_register[reg] for f, reg in self._profile.fields.items()}
        add_derived(self._profile, fields, at)
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

    def _alarms(self, values: Mapping[str, Decoded]) -> DeviceStates:
        alarms: list[str] = []
        mapped: dict[str, int | float | str] = {}  # fields whose profile maps their states
        for fname, reg in self._profile.fields.items():
            b = self._bound[reg]
            pdef = load_model(b.model_id).point(b.point_name)
            pv = values.get(reg)
            if pv is None or not pv.valid or not isinstance(pv.raw, int):
                continue
            if b.spec.enum is not None or b.spec.bits is not None:
                mapped[fname] = pv.raw
                continue
            if fname.startswith(("alarm", "fault")) and pdef.type in BITFIELD_TYPES:
                for bit in range(pdef.size * 16):
                    if pv.raw >> bit & 1:
                        alarms.append(pdef.symbol_name(bit) or f"{pdef.qualified} bit {bit}")
            elif (
                fname == "state" and pdef.type in ENUM_TYPES and pdef.symbol_name(pv.raw) == "FAULT"
            ):
                alarms.append(f"{pdef.qualified}=FAULT")
        states = sort_states(self._profile, mapped, sunspec=True)
        return DeviceStates((*alarms, *states.alarms), states.warnings)

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

    async def locate(self, specs: Sequence[RegisterSpec]) -> list[Point]:
        """Point codec: each point's address in the discovered map, and its scale factor."""
        smap = await self._ensure_map()
        out = []
        for spec in specs:
            b = self._bound[spec.name]
            m, pdef, address = smap.locate(f"{b.model_id}.{b.point_name}")
            out.append(Point(spec, address, await self._sf_value(m, pdef)))
        return out

    def _pdef(self, spec: RegisterSpec) -> PointDef:
        b = self._bound[spec.name]
        return load_model(b.model_id).point(b.point_name)

    def encode(
        self, action: ActionName, point: Point, param: str | None, value: float | str
    ) -> list[int]:
        """Point codec: a scale factor that cannot carry this write refuses it (SF 15 rounds
        every setpoint to raw 0; a raw step over 1 % of the rating is no control)."""
        spec, sf = point.spec, point.sf
        where = f"{self._device_id}: {action}: {spec.name}"
        if not isinstance(value, str):
            value = (value - spec.offset) / spec.scale
        problem = None if sf is None or sf in SF_RANGE else f"scale factor {sf} outside -10..10"
        if sf is not None and problem is None:
            step_w = abs(to_base(spec.scale * 10.0**sf, spec.unit))
            for rating in self._profile.power_ratings(param):
                problem = problem or resolution_problem(step_w, abs(rating))
        if problem is not None:
            raise ValueRefused(f"{where}: {problem}")
        try:
            return encode_point(self._pdef(spec), value, sf)
        except (EncodeError, SunSpecError) as exc:
            raise ValueRefused(f"{where}: {exc}") from None

    async def read_back(self, points: Sequence[Point]) -> dict[str, list[int] | str]:
        """Point codec: the written points, those of one model in one block read.

        A SunSpec model's registers are one block the device answers whole (:meth:`read_points`
        reads each model so), so points of one model are read back together, gaps included,
        within 125 registers per read.
        """
        spans: list[tuple[int, int, list[tuple[Point, int]]]] = []  # start, end, members
        located = sorted(
            ((p, self._bound[p.spec.name].model_id, self._pdef(p.spec).size) for p in points),
            key=lambda x: (x[1], x[0].address),
        )
        last_model = None
        for p, model_id, size in located:
            end = p.address + size
            if spans and model_id == last_model and end - spans[-1][0] <= 125:
                start, top, members = spans[-1]
                spans[-1] = (start, max(top, end), [*members, (p, size)])
            else:
                spans.append((p.address, end, [(p, size)]))
            last_model = model_id
        out: dict[str, list[int] | str] = {}
        for start, end, members in spans:
            words = await self._endpoint.read_registers(
                Table.HOLDING, start, end - start, self._unit
            )
            for p, size in members:
                out[p.spec.name] = words[p.address - start : p.address - start + size]
        return out

    def mismatch(self, point: Point, wrote: list[int], back: list[int] | str) -> str:
        """Point codec: the values written and read back, decoded."""
        pdef = self._pdef(point.spec)
        want = decode_point(pdef, wrote, point.sf)
        got = decode_point(pdef, back, point.sf) if isinstance(back, list) else None
        seen = back if got is None else got.value if got.valid else got.reason
        return f"{point.spec.name} ({pdef.qualified}): wrote {want.value!r}, read back {seen!r}"

    def _heartbeat_after(self, previous: int) -> int:
        """1, 2, ... wrapping below the 0xFFFF "not implemented" marker."""
        return previous % 0xFFFE + 1
