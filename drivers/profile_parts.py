"""Pieces of the profile schema (``schema: 2``) that :mod:`drivers.profile` assembles.

- :class:`StateValue` and :class:`Severity`: what a value of a state register (``enum:``) or a
  bit of an alarm register (``bits:``) means, and how bad it is. Only ``fault`` faults the
  device; ``warning`` is reported; ``info`` is a normal state (Sungrow's "running" 0x0040).
- :class:`Derivation`: a field computed from others (a sum, a product, a sign taken from a
  status bit, or one of two fields chosen by a condition).
- :class:`BatteryStack`: one of several batteries behind one inverter or endpoint.

Validation errors name the dotted field path; the loader puts the file name in front.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import Field, model_validator

from drivers.profile_types import Identifier, Strict


class Severity(StrEnum):
    """How much a state value or alarm bit matters to control."""

    INFO = "info"  # a normal state: nothing reported
    WARNING = "warning"  # reported (metrics, MQTT, log), the device stays in control
    FAULT = "fault"  # the device is in fault: essd stops commanding it


class StateValue(Strict):
    """The meaning of one value of a state register, or of one bit of an alarm register."""

    name: str = Field(min_length=1, max_length=120, description="The vendor's name for it")
    severity: Severity = Severity.INFO
    description: str = ""


class Condition(Strict):
    """A test on the raw (unscaled) integer of a field: one bit set, or a value."""

    field: Identifier
    bit: int | None = Field(None, ge=0, le=63)
    equals: int | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if (self.bit is None) == (self.equals is None):
            raise ValueError("exactly one of 'bit' or 'equals' must be given")
        return self

    def holds(self, raw: int) -> bool:
        """True when ``raw`` passes the test."""
        if self.bit is not None:
            return bool((raw >> self.bit) & 1)
        return raw == self.equals


class Selection(Strict):
    """``then`` when the condition holds, else ``otherwise``."""

    when: Condition
    then: Identifier
    otherwise: Identifier


class Derivation(Strict):
    """A field computed from others, in base units. Exactly one form:

    - ``sum: {field: coefficient}``: a weighted sum (battery power = outputs - inputs);
    - ``product: [a, b]`` (times ``scale``): e.g. battery power = voltage x current;
    - ``magnitude: field`` with ``negative_when: condition``: a power register without sign
      whose direction is a status bit (older Sungrow firmware);
    - ``select: {when, then, otherwise}``: one of two fields by a condition.

    ``unit`` (a base unit) is the result's; a sum and a selection default to their first
    term's, a product must say it.
    """

    sum: dict[Identifier, float] | None = None
    product: tuple[Identifier, ...] | None = Field(None, min_length=2, max_length=4)
    magnitude: Identifier | None = None
    negative_when: Condition | None = None
    select: Selection | None = None
    scale: float = 1.0
    unit: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_sum(cls, data: object) -> object:
        # schema 1: ``derived: {power_w: {a: 1.0, b: -1.0}}`` is a sum.
        forms = {"sum", "product", "magnitude", "negative_when", "select", "scale", "unit"}
        if isinstance(data, dict) and data and not (data.keys() & forms):
            return {"sum": data}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        forms = [
            name
            for name, given in (
                ("sum", self.sum is not None),
                ("product", self.product is not None),
                ("magnitude", self.magnitude is not None),
                ("select", self.select is not None),
            )
            if given
        ]
        if len(forms) != 1:
            raise ValueError(
                "exactly one of 'sum', 'product', 'magnitude' (with 'negative_when') or "
                f"'select' must be given (got {', '.join(forms) or 'none'})"
            )
        if (self.magnitude is None) != (self.negative_when is None):
            raise ValueError("'magnitude' and 'negative_when' go together")
        if self.sum is not None and not self.sum:
            raise ValueError("sum: needs at least one term")
        if self.product is not None and self.unit is None:
            raise ValueError("unit: a product must name its unit (e.g. W for V x A)")
        if self.scale == 0:
            raise ValueError("scale: must not be 0")
        return self

    def inputs(self) -> tuple[str, ...]:
        """The fields the value is computed from (not the conditions' fields)."""
        if self.sum is not None:
            return tuple(self.sum)
        if self.product is not None:
            return self.product
        if self.magnitude is not None:
            return (self.magnitude,)
        assert self.select is not None
        return (self.select.then, self.select.otherwise)

    def conditions(self) -> tuple[Condition, ...]:
        """The conditions the value depends on."""
        if self.negative_when is not None:
            return (self.negative_when,)
        if self.select is not None:
            return (self.select.when,)
        return ()


class BatteryStack(Strict):
    """One battery of several behind one inverter/endpoint (two LUNA2000 towers, GoodWe's
    battery 1 and 2). Its fields name the profile's fields of that battery; the device's own
    ``soc`` and ``power_w``, when the profile maps neither, are their capacity-weighted mean
    and their sum."""

    id: Identifier
    capacity_wh: float = Field(gt=0)
    soc: Identifier
    power_w: Identifier
    description: str = ""
