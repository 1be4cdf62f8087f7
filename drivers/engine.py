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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from drivers.api import ValueRefused, WriteResult
from drivers.layout import from_base
from drivers.modbus import ModbusEndpoint
from drivers.profile import ActionName, Profile, RegisterSpec
from drivers.registers import RegisterType

__all__ = ["TIME_PARAMS", "Point", "PointCodec", "Sense", "run_action"]

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
) -> WriteResult:
    """Run ``action`` with ``params`` (base units) for the power sense ``when``.

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
        value: float | str
        if step.param is not None:
            if params is None or step.param not in params:
                raise ValueRefused(f"{action}: parameter {step.param!r} not supplied")
            value = from_base(params[step.param], spec.unit)
            if step.param in TIME_PARAMS and spec.rtype is not RegisterType.F32:
                # Rounded up to the register's resolution: a 30 s TTL in a minutes register
                # becomes 1 min, a 0.4 s one 1 s; never 0 (which many devices read as "no
                # limit") nor shorter than asked.
                resolution = abs(spec.scale)
                value = math.ceil(value / resolution - 1e-9) * resolution
        else:
            assert step.value is not None  # the schema requires value or param
            value = step.value
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
        (point, codec.encode(action, point, step.param, value))
        for step, point, value in zip(steps, points, values, strict=True)
    ]
    for point, words in planned:
        await endpoint.write_registers(point.address, words, unit)
    # The last write of each register is what it must hold now.
    verify = {p.spec.name: (p, w) for p, w in planned if p.spec.verify and p.spec.access == "rw"}
    back = await codec.read_back([p for p, _ in verify.values()])
    mismatches: list[str] = []
    for point, words in verify.values():
        got = back.get(point.spec.name, "not read")
        if got != words:
            endpoint.note_readback_mismatch(unit)
            mismatches.append(codec.mismatch(point, words, got))
    return WriteResult(action.value, len(planned), tuple(mismatches))
