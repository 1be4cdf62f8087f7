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
    """How a driver turns register specs into addresses and words, and reads them back."""

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
    needs it). With ``memory``, an ``on_change`` action skips a step whose register holds what
    it would write (last written less than ``refresh_s`` before ``now``, and read back since);
    read-back still covers it, and a register that reads back different is forgotten.
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
    sent = 0
    for point, words, step in planned:
        if memory is not None and memory.skip(act, point.spec.name, words, now):
            continue  # on-change: the device holds these words, written < refresh_s ago
        await endpoint.write_registers(point.address, words, unit, function=step.function)
        if memory is not None:
            memory.written(point.spec.name, words, now)
        sent += 1
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
