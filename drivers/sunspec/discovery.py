"""SunSpec discovery, as the SunSpec Information Model specification describes it: the "SunS"
marker (0x53756e53) at one of the base addresses (40000, 0, 50000 by default, or the
profile's), then a chain of (model id, length) headers up to the end model 0xFFFF.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sunspec2 import mb as ss_mb

from drivers.api import CommunicationError, DeviceExceptionResponse
from drivers.registers import Table
from drivers.sunspec.models import (
    ModelDef,
    PointDef,
    SunSpecDiscoveryError,
    SunSpecError,
    load_model,
    parse_point_ref,
)

# "SunS" as two big-endian registers: the marker at a SunSpec base address.
SUNS_MARKER = (0x5375, 0x6E53)


END_MODEL_ID: int = ss_mb.SUNS_END_MODEL_ID


_MAX_MODELS = 128  # a walk longer than this is a device answering garbage, not a real map


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
