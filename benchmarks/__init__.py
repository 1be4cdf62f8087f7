"""Benchmarks for essd; run with ``make bench`` (``python -m benchmarks``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    """One measured figure: ``name`` (dotted), ``value`` and ``unit``."""

    name: str
    value: float
    unit: str
