"""The profile-driven Modbus driver: a device is a YAML profile, no code.

Reads: the registers behind the profile's fields (and their scale-factor registers) are
coalesced into as few block reads as ``transport.max_registers_per_read`` allows, decoded with
the shared codec of :mod:`drivers.layout`, and returned as readings in essd base units. A value
that is "not implemented", NaN or outside its min/max becomes an INVALID reading with a reason.

Writes: each control action is the profile's ordered list of register writes. Every value is
encoded (and refused if it does not fit) before the first write, so an action is never left half
done by a bad value; afterwards every written register is read back and a mismatch is counted and
reported.

Capability methods exist exactly when the profile declares the capability, so
``isinstance(driver, ActivePowerControl)`` answers what the device can do.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid power > 0 imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from drivers.api import (
    DeviceExceptionResponse,
    ValueRefused,
    WriteResult,
)
from drivers.base import TIME_PARAMS, ProfileDriver, Sense
from drivers.layout import (
    Decoded,
    base_unit,
    decode_register,
    encode_register,
    from_base,
    register_words,
    to_base,
    write_scale_problem,
)
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Profile, RegisterSpec, WriteStep
from drivers.registers import EncodeError, RegisterType, Table
from drivers.states import DeviceStates, sort_states
from drivers.write_policy import WriteMemory
from essd.clock import Clock
from essd.counters import DeviceCounters
from essd.domain import (
    LiveLimits,
    Quality,
    Reading,
)

__all__ = ["GenericDriver", "ReadBlock", "plan_reads"]


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One block read: ``count`` registers of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    registers: tuple[RegisterSpec, ...]


def plan_reads(
    specs: Iterable[RegisterSpec],
    *,
    max_registers: int,
    gap_max: int = 0,
    declared: Iterable[RegisterSpec] = (),
) -> tuple[ReadBlock, ...]:
    """Coalesce registers into as few block reads as possible.

    A block never exceeds ``max_registers`` and never spans more than ``gap_max`` undeclared
    registers between two wanted ones; registers the profile ``declared`` (the device has them)
    may be read across freely.
    """
    known: dict[Table, set[int]] = {Table.HOLDING: set(), Table.INPUT: set()}
    for d in declared:
        if d.address is not None:
            known[d.table].update(range(d.address, d.address + register_words(d)))
    by_table: dict[Table, list[RegisterSpec]] = {}
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            continue
        if spec.address is None:
            raise ValueError(f"register {spec.name}: a SunSpec point has no fixed address")
        if register_words(spec) > max_registers:
            raise ValueError(
                f"register {spec.name}: {register_words(spec)} words exceed "
                f"max_registers_per_read={max_registers}"
            )
        seen.add(spec.name)
        by_table.setdefault(spec.table, []).append(spec)
    blocks: list[ReadBlock] = []
    for table in (Table.HOLDING, Table.INPUT):
        members = sorted(by_table.get(table, []), key=lambda s: s.address or 0)
        current: list[RegisterSpec] = []
        start = end = 0
        for spec in members:
            assert spec.address is not None
            s_end = spec.address + register_words(spec)
            unknown = sum(1 for a in range(end, spec.address) if a not in known[table])
            if current and unknown <= gap_max and max(end, s_end) - start <= max_registers:
                current.append(spec)
                end = max(end, s_end)
                continue
            if current:
                blocks.append(ReadBlock(table, start, end - start, tuple(current)))
            current, start, end = [spec], spec.address, s_end
        if current:
            blocks.append(ReadBlock(table, start, end - start, tuple(current)))
    return tuple(blocks)


def _reading(decoded: Decoded, spec: RegisterSpec, at: float) -> Reading:
    unit = base_unit(spec.unit)
    if decoded.value is None:
        return Reading.bad(unit, at, Quality.INVALID, decoded.reason)
    if isinstance(decoded.value, str):
        return Reading.bad(unit, at, Quality.INVALID, "text register, not a number")
    return Reading.good(to_base(decoded.value, spec.unit), unit, at)


class GenericDriver(ProfileDriver):
    """A Modbus device described entirely by its profile.

    Constructing ``GenericDriver(...)`` returns an instance of a subclass that has exactly the
    capability methods the profile declares. ``limits_override`` (from the site config) can only
    tighten the profile's ratings and the device's live limits; ``capacity_wh`` overrides the
    rated capacity.
    """

    _compose_root = True

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        endpoint: ModbusEndpoint,
        unit: int | None = None,
        clock: Clock,
        limits_override: LiveLimits | None = None,
        capacity_wh: float | None = None,
        owns_endpoint: bool = False,
    ) -> None:
        if profile.driver != "generic":
            raise ValueError(f"profile {profile.name}: driver is {profile.driver!r}, not generic")
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
        read_specs: list[RegisterSpec] = []
        for reg_name in profile.fields.values():
            spec = profile.register(reg_name)
            read_specs.append(spec)
            if spec.scale_factor is not None:
                read_specs.append(profile.register(spec.scale_factor))
        self._plans: dict[tuple[str, ...], tuple[ReadBlock, ...]] = {}
        self._blocks = self._plan(read_specs)
        self._written = WriteMemory()  # on-change actions skip what the device already holds

    def _plan(self, specs: Iterable[RegisterSpec]) -> tuple[ReadBlock, ...]:
        """Block reads for ``specs`` within the profile's transport limits.

        The same few register sets are read back after every action: their plans are cached
        (a profile is frozen, so a plan never goes stale).
        """
        specs = tuple(specs)
        key = tuple(spec.name for spec in specs)
        plan = self._plans.get(key)
        if plan is None:
            t = self._profile.transport
            plan = plan_reads(
                specs,
                max_registers=t.max_registers_per_read,
                gap_max=t.read_gap_max,
                declared=self._profile.registers,
            )
            self._plans[key] = plan
        return plan

    # -- identity ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> ModbusEndpoint:
        """The (possibly shared) transport."""
        return self._endpoint

    @property
    def read_plan(self) -> tuple[ReadBlock, ...]:
        """The block reads one :meth:`read` performs."""
        return self._blocks

    def counters(self) -> DeviceCounters:
        """Cumulative communication counters of this device."""
        return self._endpoint.stats(self._unit).to_device_counters()

    # -- lifetime ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the transport (CommunicationError if it cannot; reconnects back off)."""
        await self._endpoint.connect()

    async def close(self) -> None:
        """Close the transport when this driver owns it (a shared one is the pool's)."""
        if self._owns_endpoint:
            await self._endpoint.close()

    # -- reading -------------------------------------------------------------------------------

    async def _read_words(
        self, blocks: Iterable[ReadBlock]
    ) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Words per register name, and the reason for registers whose block was refused."""
        words: dict[str, list[int]] = {}
        refused: dict[str, str] = {}
        for block in blocks:
            try:
                data = await self._endpoint.read_registers(
                    block.table, block.address, block.count, self._unit
                )
            except DeviceExceptionResponse as exc:
                for spec in block.registers:
                    refused[spec.name] = str(exc)
                continue
            for spec in block.registers:
                assert spec.address is not None
                offset = spec.address - block.address
                words[spec.name] = data[offset : offset + register_words(spec)]
        return words, refused

    def _sf_of(self, spec: RegisterSpec, words: Mapping[str, list[int]]) -> int | None:
        if spec.scale_factor is None:
            return None
        sf_spec = self._profile.register(spec.scale_factor)
        w = words.get(sf_spec.name)
        if w is None:
            return None
        sf = decode_register(sf_spec, w, transport=self._profile.transport)
        if sf.value is None or not isinstance(sf.raw, int):
            return None
        return sf.raw

    async def read_fields(self) -> dict[str, Reading]:
        """Every field of the profile (and derived field) as a reading in base units.

        Raises CommunicationError when the device does not answer.
        """
        fields, _ = await self._read_fields_and_raw()
        return fields

    async def _read_fields_and_raw(
        self,
    ) -> tuple[dict[str, Reading], dict[str, int | float | str]]:
        words, refused = await self._read_words(self._blocks)
        at = self._clock.monotonic()
        out: dict[str, Reading] = {}
        raw: dict[str, int | float | str] = {}
        for field, reg_name in self._profile.fields.items():
            spec = self._profile.register(reg_name)
            if reg_name in refused:
                out[field] = Reading.bad(
                    base_unit(spec.unit), at, Quality.MISSING, refused[reg_name]
                )
                continue
            decoded = decode_register(
                spec,
                words[reg_name],
                transport=self._profile.transport,
                sf=self._sf_of(spec, words),
            )
            out[field] = _reading(decoded, spec, at)
            raw[field] = decoded.raw
        self._add_derived(out, at, raw)
        return out, raw

    def _alarms(
        self, fields: Mapping[str, Reading], raws: Mapping[str, int | float | str]
    ) -> DeviceStates:
        """Faults and warnings of the valid state and alarm fields (:mod:`drivers.states`)."""
        valid = {f: raw for f, raw in raws.items() if f in fields and fields[f].valid}
        return sort_states(self._profile, valid)

    async def _read_state(
        self,
    ) -> tuple[float, dict[str, Reading], dict[str, Reading], DeviceStates]:
        fields, raws = await self._read_fields_and_raw()
        return self._clock.monotonic(), fields, fields, self._alarms(fields, raws)

    # -- writing -------------------------------------------------------------------------------

    async def _scale_factors(self, specs: Iterable[RegisterSpec]) -> dict[str, int | None]:
        names = {s.scale_factor for s in specs if s.scale_factor is not None}
        if not names:
            return {}
        sf_specs = [self._profile.register(n) for n in names]
        blocks = self._plan(sf_specs)
        words, _ = await self._read_words(blocks)
        out: dict[str, int | None] = {}
        for sf_spec in sf_specs:
            w = words.get(sf_spec.name)
            d = (
                None
                if w is None
                else decode_register(sf_spec, w, transport=self._profile.transport)
            )
            out[sf_spec.name] = (
                d.raw if d is not None and d.valid and isinstance(d.raw, int) else None
            )
        return out

    def _value_for(self, spec: RegisterSpec, param: str, base_value: float) -> float:
        value = from_base(base_value, spec.unit)
        # Rounded up in coarser register units: a 30 s TTL in a minutes register becomes 1 min.
        if param in TIME_PARAMS and spec.rtype is not RegisterType.F32:
            resolution = abs(spec.scale)
            value = math.ceil(value / resolution - 1e-9) * resolution
        return value

    async def _divisor(self, action: ActionName, field: str) -> float:
        """The live value of ``field`` (base units) a parameter is divided by; ValueRefused
        (nothing written) when it is not a positive reading."""
        spec = self._profile.register(self._profile.fields[field])
        words, refused = await self._read_words(self._plan([spec]))
        got = words.get(spec.name)
        decoded = (
            None if got is None else decode_register(spec, got, transport=self._profile.transport)
        )
        if decoded is None or not isinstance(decoded.value, float) or decoded.value <= 0:
            why = refused.get(spec.name) or (decoded.reason if decoded else "") or "not > 0"
            raise ValueRefused(f"{self._device_id}: {action}: {field} is not usable ({why})")
        return to_base(decoded.value, spec.unit)

    async def _step_value(
        self, action: ActionName, step: WriteStep, spec: RegisterSpec, params: Mapping[str, float]
    ) -> float | str:
        """A step's value in the register's unit: its literal, or its parameter (divided by
        the live ``divide_by`` field where the profile says so)."""
        if step.param is None:
            assert step.value is not None
            return step.value
        if step.param not in params:
            raise ValueRefused(f"{action}: parameter {step.param!r} not supplied")
        base = params[step.param]
        if step.divide_by is not None:
            base /= await self._divisor(action, step.divide_by)
        return self._value_for(spec, step.param, base)

    async def perform(
        self,
        action: ActionName,
        params: Mapping[str, float] | None = None,
        *,
        when: Sense = "always",
    ) -> WriteResult:
        """Run one of the profile's actions with ``params`` (base units); read every write back.

        Raises ValueRefused (nothing written) when a value does not fit its register, and
        CommunicationError / DeviceExceptionResponse when a write fails.
        """
        act = self._profile.actions.get(action)
        if act is None:
            raise ValueRefused(f"{self._device_id}: profile {self._profile.name} has no {action}")
        params = dict(params or {})
        steps = [s for s in act.writes if s.when in ("always", when)]
        specs = [self._profile.register(s.register) for s in steps]
        sfs = await self._scale_factors(specs)
        encoded: list[tuple[RegisterSpec, list[int], WriteStep]] = []
        for step, spec in zip(steps, specs, strict=True):
            value = await self._step_value(action, step, spec, params)
            sf = sfs.get(spec.scale_factor) if spec.scale_factor is not None else None
            if sf is not None:
                # The scale factor is the device's: one that cannot carry the rating (SF 15
                # rounds every setpoint to raw 0) refuses the write rather than send nonsense.
                problem = write_scale_problem(
                    spec,
                    self._profile.power_ratings(step.param),
                    transport=self._profile.transport,
                    sf=sf,
                )
                if problem is not None:
                    raise ValueRefused(f"{self._device_id}: {action}: {spec.name}: {problem}")
            try:
                words = encode_register(spec, value, transport=self._profile.transport, sf=sf)
            except EncodeError as exc:
                raise ValueRefused(f"{self._device_id}: {action}: {exc}") from None
            encoded.append((spec, words, step))
        now = self._clock.monotonic()
        sent = 0
        for spec, words, step in encoded:
            assert spec.address is not None
            if self._written.skip(act, spec.name, words, now):
                continue  # on-change: the device holds these words, written < refresh_s ago
            await self._endpoint.write_registers(
                spec.address, words, self._unit, function=step.function
            )
            self._written.written(spec.name, words, now)
            sent += 1
        expected = {spec.name: (spec, words) for spec, words, _ in encoded}
        to_verify = [spec for spec, _ in expected.values() if spec.verify and spec.access == "rw"]
        blocks = self._plan(to_verify)
        got, refused = await self._read_words(blocks)
        mismatches: list[str] = []
        for spec in to_verify:
            want = expected[spec.name][1]
            have = got.get(spec.name)
            if have != want:
                self._endpoint.note_readback_mismatch(self._unit)
                self._written.forget(spec.name)
                seen = refused.get(spec.name, str(have))
                mismatches.append(f"{spec.name}: wrote {want}, read back {seen}")
        return WriteResult(action.value, sent, tuple(mismatches))

    async def _run_action(
        self, action: ActionName, params: Mapping[str, float] | None, when: Sense
    ) -> WriteResult:
        return await self.perform(action, params, when=when)

    def _heartbeat_after(self, previous: int) -> int:
        """Count up, and wrap to 0 past what the counter register holds."""
        act = self._profile.actions[ActionName.HEARTBEAT]
        limit = 0xFFFF
        for step in act.writes:
            if step.param == "counter":
                spec = self._profile.register(step.register)
                limit = 0x7FFF if spec.rtype is RegisterType.S16 else 0xFFFF
                if spec.max is not None:
                    limit = min(limit, int(spec.max))
        nxt = previous + 1
        return 0 if nxt > limit else nxt
