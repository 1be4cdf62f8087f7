"""Derived fields and battery-stack aggregates, computed from the fields a driver read.

Every driver calls :func:`add_derived` after decoding its registers. A derivation's inputs
are readings in base units; its conditions test the raw (unscaled) integer of a field. A
derived value is invalid, with a reason, when any input (or condition field) is.

Battery power in W: > 0 discharges into the site, < 0 charges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from drivers.profile_parts import Condition, Derivation
from essd.domain import Quality, Reading

if TYPE_CHECKING:
    from drivers.profile import Profile


def _condition(cond: Condition, raws: Mapping[str, int | float | str]) -> tuple[bool | None, str]:
    raw = raws.get(cond.field)
    if not isinstance(raw, int):
        return None, f"condition field {cond.field} has no valid raw value"
    return cond.holds(raw), ""


def evaluate(  # noqa: PLR0911 - one return per form and per invalid input
    d: Derivation, values: Mapping[str, Reading], raws: Mapping[str, int | float | str]
) -> tuple[float | None, str]:
    """The value of ``d`` from ``values`` (base units), or None and the reason."""
    bad = [f for f in d.inputs() if f not in values or not values[f].valid]
    if d.select is not None:
        holds, why = _condition(d.select.when, raws)
        if holds is None:
            return None, why
        chosen = d.select.then if holds else d.select.otherwise
        r = values.get(chosen)
        if r is None or r.value is None:
            return None, f"derived from invalid {chosen}"
        return r.value * d.scale, ""
    if bad:
        return None, f"derived from invalid {', '.join(bad)}"

    def v(name: str) -> float:
        value = values[name].value
        assert value is not None
        return value

    if d.sum is not None:
        return sum(v(f) * k for f, k in d.sum.items()) * d.scale, ""
    if d.product is not None:
        return math.prod(v(f) for f in d.product) * d.scale, ""
    assert d.magnitude is not None
    assert d.negative_when is not None
    holds, why = _condition(d.negative_when, raws)
    if holds is None:
        return None, why
    size = abs(v(d.magnitude)) * abs(d.scale)
    return (-size if holds else size), ""


def _unit_of(d: Derivation, values: Mapping[str, Reading]) -> str:
    if d.unit is not None:
        return d.unit
    first = d.inputs()[0]
    return values[first].unit if first in values else ""


def add_derived(
    profile: Profile,
    out: dict[str, Reading],
    at: float,
    raws: Mapping[str, int | float | str] | None = None,
) -> None:
    """Add the profile's derived fields, then the stacks' aggregate SoC and power where the
    profile maps neither, to ``out`` (in place)."""
    raws = raws or {}
    for name, d in profile.derived.items():
        value, why = evaluate(d, out, raws)
        unit = _unit_of(d, out)
        out[name] = (
            Reading.good(value, unit, at)
            if value is not None and math.isfinite(value)
            else Reading.bad(unit, at, Quality.INVALID, why or "not a finite number")
        )
    stacks = profile.batteries
    if not stacks:
        return
    if "soc" not in out:
        socs = [(s.capacity_wh, out.get(s.soc)) for s in stacks]
        bad = [s.id for s, (_, r) in zip(stacks, socs, strict=True) if r is None or not r.valid]
        total = sum(cap for cap, _ in socs)
        out["soc"] = (
            Reading.bad("ratio", at, Quality.INVALID, f"battery {', '.join(bad)} SoC invalid")
            if bad
            else Reading.good(
                sum(cap * (r.value or 0.0) for cap, r in socs if r is not None) / total, "ratio", at
            )
        )
    if "power_w" not in out:
        powers = [out.get(s.power_w) for s in stacks]
        bad = [s.id for s, r in zip(stacks, powers, strict=True) if r is None or not r.valid]
        out["power_w"] = (
            Reading.bad("W", at, Quality.INVALID, f"battery {', '.join(bad)} power invalid")
            if bad
            else Reading.good(sum(r.value or 0.0 for r in powers if r is not None), "W", at)
        )
