"""What the central system knows about each charger: connection, connector status, meter
values, transactions and the limit last applied. Owned by the central system and kept across
reconnects, so a charger that drops its WebSocket mid-session resumes the same session.

Units: power W (> 0 the charger draws from the site), energy Wh, current A, times epoch s.
The OCPP layer fills it (one event loop, no locks); readers get frozen copies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class RateUnit(StrEnum):
    """The unit a charger takes its charging-schedule limits in (OCPP ChargingRateUnitType)."""

    WATTS = "W"
    AMPS = "A"  # per phase


@dataclass(frozen=True, slots=True)
class MeterSample:
    """The latest measured values of one connector/EVSE (NaN where not reported)."""

    at: float
    power_w: float = math.nan
    energy_wh: float = math.nan
    current_a: float = math.nan  # per phase, the largest phase
    voltage_v: float = math.nan
    soc: float = math.nan  # ratio 0..1 (OCPP reports percent)


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    """One charging session as the charger reported it."""

    transaction_id: str
    connector_id: int
    id_tag: str
    started_at: float
    meter_start_wh: float
    stopped_at: float | None = None
    meter_stop_wh: float | None = None
    stop_reason: str = ""


@dataclass(frozen=True, slots=True)
class ConnectorInfo:
    """Status of one connector (1.6) or EVSE (2.0.1) as last notified."""

    status: str
    error_code: str = "NoError"
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class ChargerInfo:
    """A frozen view of one charger for the control layer and the adapters."""

    id: str
    protocol: str
    connected: bool
    vendor: str
    model: str
    connectors: Mapping[int, ConnectorInfo]
    meter: Mapping[int, MeterSample]
    transactions: Sequence[TransactionInfo]
    applied_limit_w: Mapping[int, float]
    rejected_profiles: int


@dataclass(slots=True)
class ChargerRecord:
    """The mutable record of one charger inside the central system."""

    id: str
    protocol: str = ""
    connected: bool = False
    vendor: str = ""
    model: str = ""
    connectors: dict[int, ConnectorInfo] = field(default_factory=dict)
    meter: dict[int, MeterSample] = field(default_factory=dict)
    transactions: dict[str, TransactionInfo] = field(default_factory=dict)
    applied_limit_w: dict[int, float] = field(default_factory=dict)
    rejected_profiles: int = 0
    next_transaction: int = 1

    def active(self, connector_id: int) -> TransactionInfo | None:
        """The transaction running on ``connector_id``, if any."""
        for tx in self.transactions.values():
            if tx.connector_id == connector_id and tx.stopped_at is None:
                return tx
        return None

    def view(self) -> ChargerInfo:
        """A frozen copy."""
        return ChargerInfo(
            id=self.id,
            protocol=self.protocol,
            connected=self.connected,
            vendor=self.vendor,
            model=self.model,
            connectors=dict(self.connectors),
            meter=dict(self.meter),
            transactions=tuple(self.transactions.values()),
            applied_limit_w=dict(self.applied_limit_w),
            rejected_profiles=self.rejected_profiles,
        )


def parse_time(text: object, default: float) -> float:
    """An OCPP timestamp (RFC 3339) as epoch seconds; ``default`` when absent or unreadable."""
    if not isinstance(text, str):
        return default
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return default
    if stamp.tzinfo is None:
        return default
    return stamp.timestamp()


# Measurand -> (field, unit -> factor to essd's unit). 1.6 gives units as text ("kW"); 2.0.1
# as unitOfMeasure {unit, multiplier}; both are normalized here.
_MEASURANDS: Mapping[str, tuple[str, Mapping[str, float]]] = {
    "Power.Active.Import": ("power_w", {"W": 1.0, "kW": 1000.0}),
    "Energy.Active.Import.Register": ("energy_wh", {"Wh": 1.0, "kWh": 1000.0}),
    "Current.Import": ("current_a", {"A": 1.0}),
    "Voltage": ("voltage_v", {"V": 1.0}),
    "SoC": ("soc", {"Percent": 0.01}),
}
_DEFAULT_UNIT = {
    "power_w": "W",
    "energy_wh": "Wh",
    "current_a": "A",
    "voltage_v": "V",
    "soc": "Percent",
}


def _number(value: object) -> float:
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _sampled(sv: object) -> tuple[str, float, str] | None:
    """(field, value in essd's unit, phase) of one sampledValue; None to skip it."""
    if not isinstance(sv, dict):
        return None
    measurand = sv.get("measurand", "Energy.Active.Import.Register")
    if measurand not in _MEASURANDS:
        return None
    name, factors = _MEASURANDS[measurand]
    unit_of_measure = sv.get("unit_of_measure")
    multiplier = 0.0
    if isinstance(unit_of_measure, dict):
        unit = unit_of_measure.get("unit", _DEFAULT_UNIT[name])
        multiplier = _number(unit_of_measure.get("multiplier", 0))
        if not math.isfinite(multiplier):
            return None
    else:
        unit = sv.get("unit", _DEFAULT_UNIT[name])
    v = _number(sv.get("value")) * factors.get(unit, math.nan) * 10.0**multiplier
    if not math.isfinite(v):
        return None
    return name, v, str(sv.get("phase") or "")


def parse_meter_values(
    meter_value: object, now: float, previous: MeterSample | None
) -> MeterSample:
    """The newest readings in an OCPP ``meterValue`` list (1.6 or 2.0.1, snake_case keys).

    Unknown measurands and unreadable values are skipped (a charger's extras are not errors);
    fields not reported keep their previous value. Per-phase currents give the largest phase;
    per-phase power is summed unless a total is reported too.
    """
    values: dict[str, Any] = {}
    if previous is not None:
        values = {name: getattr(previous, name) for name in _DEFAULT_UNIT}
    at = now
    for entry in meter_value if isinstance(meter_value, list) else []:
        if not isinstance(entry, dict):
            continue
        at = parse_time(entry.get("timestamp"), now)
        samples = [_sampled(sv) for sv in entry.get("sampled_value") or []]
        currents = [s[1] for s in samples if s and s[0] == "current_a"]
        phase_power = [s[1] for s in samples if s and s[0] == "power_w" and s[2]]
        for s in samples:
            if s and s[0] != "current_a" and not (s[0] == "power_w" and s[2]):
                values[s[0]] = s[1]
        has_total = any(s and s[0] == "power_w" and not s[2] for s in samples)
        if currents:
            values["current_a"] = max(currents)
        if phase_power and not has_total:
            values["power_w"] = sum(phase_power)
    return MeterSample(at=at, **values)
