"""Per-device communication counters, kept by the drivers' transport and read by the cycle.

A core type: drivers fill it, the cycle record carries it, metrics and MQTT read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DeviceCounters:
    """Cumulative per-device communication counters (since start)."""

    requests_total: int = 0
    errors_total: Mapping[str, int] = field(default_factory=dict)  # by kind: timeout, exception...
    writes_total: int = 0
    readback_mismatches_total: int = 0
    last_latency_s: float | None = None
