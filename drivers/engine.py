"""The one action engine of every profile driver: select steps, resolve parameters, encode,
write, read back.

A profile action is an ordered list of register writes. The engine keeps the steps whose
``when`` matches the power sense, resolves each step's value (a parameter in essd base units,
or a literal in the register's unit), has the driver's :class:`PointCodec` encode every value
before the first write (so a value that does not fit refuses the whole action, nothing half
done), writes in order, and reads back every ``rw`` register that is not a self-clearing
trigger (``verify: false``). How a register is located and encoded is the codec's business:
plain address-based registers (:class:`drivers.generic.GenericDriver`) or SunSpec points
(:class:`drivers.sunspec.SunSpecDriver`).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, Protocol

from drivers.api import ValueRefused, WriteResult
from drivers.layout import from_base
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Profile, RegisterSpec, WriteStep
from drivers.registers import RegisterType
from drivers.write_policy import WriteMemory

# Parameters in seconds: rounded up when converted to a register.
TIME_PARAMS = frozenset({"duration_s", "seconds"})

Sense = Literal["always", "charge", "discharge", "idle"]


@dataclass(frozen=True, slots=True)
class Point:
    """A register located on the device: its address and the scale factor it has now."""

    spec: RegisterSpec
    address: int
    sf: int | None = None


class PointCodec(Protocol):
    """How a driver turns register specs into addresses and words, and reads them back.

    ``merge_writes``: the device takes consecutive steps on adjacent registers as one
    function-16 write (SunSpec requires function 16; a plain profile says so with
    ``transport.merge_writes``).
    """

    merge_writes: bool

    async def locate(self, specs: Sequence[RegisterSpec]) -> list[Point]:
        """Each register's address and current scale factor (reading what it must)."""
        ...

    def encode(
        self, action: ActionName, point: Point, param: str | None, value: float | str
    ) -> list[int]:
        """The words of one step's ``value`` (register units, within the register's min/max).
        ValueRefused naming the register when it does not fit."""
        ...

    async def read_back(self, points: Sequence[Point]) -> dict[str, list[int] | str]:
        """The words each register holds now, or why it could not be read (by spec name)."""
        ...

    def mismatch(self, point: Point, wrote: list[int], back: list[int] | str) -> str:
        """How a read-back differs from what was written, for the log and the result."""
        ...


async def _step_value(
    step: WriteStep,
    spec: RegisterSpec,
    params: Mapping[str, float] | None,
    *,
    action: ActionName,
    device_id: str,
    divisor: Callable[[ActionName, str], Awaitable[float]] | None,
) -> float | str:
    """A step's value in the register's unit: its literal, or its parameter (base units),
    divided by the live ``divide_by`` field where the profile says so."""
    if step.param is None:
        assert step.value is not None  # the schema requires value or param
        return step.value
    if params is None or step.param not in params:
        raise ValueRefused(f"{action}: parameter {step.param!r} not supplied")
    base = params[step.param]
    if step.divide_by is not None:
        if divisor is None:
            raise ValueRefused(f"{device_id}: {action}: cannot read {step.divide_by}")
        base /= await divisor(action, step.divide_by)
    value = from_base(base, spec.unit)
    if step.param in TIME_PARAMS and spec.rtype is not RegisterType.F32:
        # Rounded up to the register's resolution: a 30 s TTL in a minutes register becomes
        # 1 min, a 0.4 s one 1 s; never 0 (which many devices read as "no limit") nor shorter
        # than asked.
        resolution = abs(spec.scale)
        value = math.ceil(value / resolution - 1e-9) * resolution
    return value


def _requests(
    due: Sequence[tuple[Point, list[int], WriteStep]], *, merge: bool
) -> list[tuple[int, list[int], Literal[6, 16] | None, list[tuple[Point, list[int]]]]]:
    """The write requests of the steps ``due``, in their order.

    With ``merge``, consecutive steps whose registers together are one block of adjacent
    registers (in whichever order the action lists them, none twice, none asking for
    function 6, at most 123 words) go as one function-16 write of that block: the device takes
    them in one transaction, so their order within it does not matter.
    """
    groups: list[list[tuple[Point, list[int], WriteStep]]] = []
    for item in due:
        if groups and merge and _joins(groups[-1], item):
            groups[-1].append(item)
        else:
            groups.append([item])
    out: list[tuple[int, list[int], Literal[6, 16] | None, list[tuple[Point, list[int]]]]] = []
    for group in groups:
        if len(group) == 1:
            point, words, step = group[0]
            out.append((point.address, words, step.function, [(point, words)]))
            continue
        ordered = sorted(group, key=lambda g: g[0].address)
        block = [w for _, words, _ in ordered for w in words]
        out.append((ordered[0][0].address, block, 16, [(p, w) for p, w, _ in group]))
    return out


def _joins(
    group: Sequence[tuple[Point, list[int], WriteStep]], item: tuple[Point, list[int], WriteStep]
) -> bool:
    """Whether ``item`` extends ``group`` to a larger block of adjacent registers."""
    if any(step.function == 6 for _, _, step in (*group, item)):
        return False
    spans = sorted((p.address, p.address + len(w)) for p, w, _ in (*group, item))
    if spans[-1][1] - spans[0][0] > 123:
        return False
    return all(a_end == b_start for (_, a_end), (b_start, _) in pairwise(spans))


async def run_action(
    codec: PointCodec,
    endpoint: ModbusEndpoint,
    *,
    unit: int,
    profile: Profile,
    device_id: str,
    action: ActionName,
    params: Mapping[str, float] | None,
    when: Sense,
    memory: WriteMemory | None = None,
    now: float = 0.0,
    divisor: Callable[[ActionName, str], Awaitable[float]] | None = None,
) -> WriteResult:
    """Run ``action`` with ``params`` (base units) for the power sense ``when``.

    Each step is written with its ``function`` code (16 for one register where the device
    needs it); where the codec allows, consecutive steps on adjacent registers go as one
    function-16 request. With ``memory``, an ``on_change`` action skips a step whose
    register holds what it would write (last written less than ``refresh_s`` before ``now``,
    and read back since); read-back still covers it, and a register that reads back different
    is forgotten.
    ``divisor`` gives the live value of a step's ``divide_by`` field.

    Raises ValueRefused (nothing written) when the profile has no such action, a parameter is
    missing or a value does not fit; CommunicationError / DeviceExceptionResponse when a write
    fails.
    """
    act = profile.actions.get(action)
    if act is None:
        raise ValueRefused(f"{device_id}: profile {profile.name} has no {action}")
    steps = [s for s in act.writes if s.when in ("always", when)]
    specs = [profile.register(s.register) for s in steps]
    values: list[float | str] = []
    for step, spec in zip(steps, specs, strict=True):
        value = await _step_value(
            step, spec, params, action=action, device_id=device_id, divisor=divisor
        )
        if not isinstance(value, str) and (
            (spec.min is not None and value < spec.min)
            or (spec.max is not None and value > spec.max)
        ):
            raise ValueRefused(
                f"{device_id}: {action}: {spec.name} = {value:g} outside [{spec.min}, {spec.max}]"
            )
        values.append(value)
    # Every value is checked before anything is read or written; the codec then reads what
    # it needs (scale factors) and encodes each value before the first write.
    points = await codec.locate(specs)
    planned = [
        (point, codec.encode(action, point, step.param, value), step)
        for step, point, value in zip(steps, points, values, strict=True)
    ]
    # On-change: a step is skipped while the device holds its words (written < refresh_s ago),
    # unless this action already writes that register before it.
    due: list[tuple[Point, list[int], WriteStep]] = []
    for point, words, step in planned:
        name = point.spec.name
        held = memory is not None and memory.skip(act, name, words, now)
        if held and all(p.spec.name != name for p, _, _ in due):
            continue
        due.append((point, words, step))
    sent = 0
    for address, request, function, members in _requests(due, merge=codec.merge_writes):
        await endpoint.write_registers(address, request, unit, function=function)
        if memory is not None:
            for point, point_words in members:
                memory.written(point.spec.name, point_words, now)
        sent += len(members)
    # The last write of each register is what it must hold now.
    verify = {p.spec.name: (p, w) for p, w, _ in planned if p.spec.verify and p.spec.access == "rw"}
    back = await codec.read_back([p for p, _ in verify.values()])
    mismatches: list[str] = []
    for point, words in verify.values():
        got = back.get(point.spec.name, "not read")
        if got != words:
            endpoint.note_readback_mismatch(unit)
            if memory is not None:
                memory.forget(point.spec.name)
            mismatches.append(codec.mismatch(point, words, got))
    return WriteResult(action.value, sent, tuple(mismatches))
