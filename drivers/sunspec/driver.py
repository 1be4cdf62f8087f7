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

import math
from collections.abc import Mapping
from dataclasses import dataclass

from drivers.api import (
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
)
from drivers.states import DeviceStates, sort_states
from drivers.sunspec.codec import (
    SF_RANGE,
    PointValue,
    decode_point,
    encode_point,
    is_not_implemented,
)
from drivers.sunspec.discovery import DiscoveredModel, RegisterEndpoint, SunSpecMap, discover
from drivers.sunspec.models import (
    BITFIELD_TYPES,
    ENUM_TYPES,
    PointDef,
    SunSpecDiscoveryError,
    SunSpecError,
    load_model,
    parse_point_ref,
)
from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.domain import (
    LiveLimits,
    Quality,
    Reading,
)

__all__ = ["SunSpecDriver"]


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
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], DeviceStates]:
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

    def _alarms(self, values: Mapping[str, PointValue]) -> DeviceStates:
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
        problem = f"scale factor {sf} outside -10..10" if sf not in SF_RANGE else None
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
