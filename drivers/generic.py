"""The profile-driven Modbus driver: a device is a YAML profile, no code.

Reads: the registers behind the profile's fields (and their scale-factor registers) are
coalesced into as few block reads as ``transport.max_registers_per_read`` allows, decoded with
the shared codec of :mod:`drivers.layout`, and returned as readings in essd base units. A value
that is "not implemented", NaN or outside its min/max becomes an INVALID reading with a reason.

Writes: the one action engine (:mod:`drivers.engine`) runs each control action with this
driver as the codec of its plain registers: addresses from the profile, scale factors read from
their registers, values encoded with the shared codec of :mod:`drivers.layout`.

Battery power in W: > 0 discharges into the site, < 0 charges. Grid power > 0 imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from drivers.api import DeviceExceptionResponse, ValueRefused
from drivers.base import ProfileDriver
from drivers.derive import add_derived
from drivers.engine import Point
from drivers.layout import (
    Decoded,
    base_unit,
    decode_register,
    encode_register,
    register_words,
    to_base,
    write_scale_problem,
)
from drivers.profile import ActionName, RegisterSpec
from drivers.registers import EncodeError, RegisterType, Table
from drivers.states import DeviceStates, sort_states
from essd.domain import Quality, Reading


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
            if (
                current
                and max(end, s_end) - start <= max_registers
                and _unknown_at_most(gap_max, range(end, spec.address), known[table])
            ):
                current.append(spec)
                end = max(end, s_end)
                continue
            if current:
                blocks.append(ReadBlock(table, start, end - start, tuple(current)))
            current, start, end = [spec], spec.address, s_end
        if current:
            blocks.append(ReadBlock(table, start, end - start, tuple(current)))
    return tuple(blocks)


def _unknown_at_most(limit: int, addresses: range, known: set[int]) -> bool:
    """Whether at most ``limit`` of ``addresses`` are undeclared (stops counting past it)."""
    unknown = 0
    for a in addresses:
        if a not in known:
            unknown += 1
            if unknown > limit:
                return False
    return True


def _reading(decoded: Decoded, spec: RegisterSpec, at: float) -> Reading:
    unit = base_unit(spec.unit)
    if decoded.value is None:
        return Reading.bad(unit, at, Quality.INVALID, decoded.reason)
    if isinstance(decoded.value, str):
        return Reading.bad(unit, at, Quality.INVALID, "text register, not a number")
    return Reading.good(to_base(decoded.value, spec.unit), unit, at)


class GenericDriver(ProfileDriver):
    """A Modbus device described entirely by its profile: the point codec of plain registers."""

    def _bind(self) -> None:
        profile = self._profile
        if profile.driver != "generic":
            raise ValueError(f"profile {profile.name}: driver is {profile.driver!r}, not generic")
        read_specs: list[RegisterSpec] = []
        for reg_name in profile.fields.values():
            spec = profile.register(reg_name)
            read_specs.append(spec)
            if spec.scale_factor is not None:
                read_specs.append(profile.register(spec.scale_factor))
        self._plans: dict[tuple[str, ...], tuple[ReadBlock, ...]] = {}
        self._blocks = self._plan(read_specs)
        self.merge_writes = profile.transport.merge_writes  # see drivers.engine.PointCodec

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

    @property
    def read_plan(self) -> tuple[ReadBlock, ...]:
        """The block reads one :meth:`read` performs."""
        return self._blocks

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

    async def _read_fields_and_raw(self) -> tuple[dict[str, Reading], dict[str, int | float | str]]:
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
        add_derived(self._profile, out, at, raw)
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

    async def locate(self, specs: Sequence[RegisterSpec]) -> list[Point]:
        """Point codec: the profile's addresses, and the scale factors read now."""
        sfs = await self._scale_factors(specs)
        out = []
        for spec in specs:
            assert spec.address is not None  # a generic profile maps addresses only
            sf = sfs.get(spec.scale_factor) if spec.scale_factor is not None else None
            out.append(Point(spec, spec.address, sf))
        return out

    def encode(
        self, action: ActionName, point: Point, param: str | None, value: float | str
    ) -> list[int]:
        """Point codec: a scale factor that cannot carry the rating (SF 15 rounds every
        setpoint to raw 0) refuses the write rather than send nonsense."""
        spec, sf = point.spec, point.sf
        transport = self._profile.transport
        if sf is not None:
            ratings = self._profile.power_ratings(param)
            problem = write_scale_problem(spec, ratings, transport=transport, sf=sf)
            if problem is not None:
                raise ValueRefused(f"{self._device_id}: {action}: {spec.name}: {problem}")
        try:
            return encode_register(spec, value, transport=transport, sf=sf)
        except EncodeError as exc:
            raise ValueRefused(f"{self._device_id}: {action}: {exc}") from None

    async def read_back(self, points: Sequence[Point]) -> dict[str, list[int] | str]:
        """Point codec: the written registers in as few block reads as the transport allows."""
        got, refused = await self._read_words(self._plan(p.spec for p in points))
        return {**refused, **got}

    def mismatch(self, point: Point, wrote: list[int], back: list[int] | str) -> str:
        """Point codec: the words written and the words (or error) read back."""
        return f"{point.spec.name}: wrote {wrote}, read back {back}"

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
