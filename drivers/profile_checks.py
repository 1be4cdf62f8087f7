"""Checks of a whole profile that reach across its sections (called by :class:`Profile`'s
validators): literal writes and power registers, derivations, battery stacks, write function
codes, on-change writes, and which schema version a construct needs.

Each problem is a ValueError whose message starts with the dotted field path; the loader puts
the file name in front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.layout import UNITS, base_unit, encode_register, register_words, write_scale_problem
from drivers.registers import EncodeError, RegisterType, word_count

if TYPE_CHECKING:
    from drivers.profile import Profile, RegisterSpec


_BASE_UNITS = frozenset(base for base, _ in UNITS.values())
_INTEGER_TYPES = frozenset(
    {
        RegisterType.U16,
        RegisterType.S16,
        RegisterType.U32,
        RegisterType.S32,
        RegisterType.U64,
        RegisterType.S64,
    }
)


def check_states(spec: RegisterSpec) -> None:
    """An enum or bit map belongs to an integer register and fits its width."""
    if spec.enum is None and spec.bits is None:
        return
    what = "enum" if spec.enum is not None else "bits"
    if spec.enum is not None and spec.bits is not None:
        raise ValueError("enum: a register is a state (enum) or an alarm word (bits)")
    if spec.point is None and spec.rtype in (RegisterType.F32, RegisterType.STRING):
        raise ValueError(f"{what}: needs an integer register, not {spec.rtype.value}")
    mapping = spec.enum if spec.enum is not None else spec.bits
    assert mapping is not None
    if not mapping:
        raise ValueError(f"{what}: lists no value")
    words = 4 if spec.point is not None else word_count(spec.rtype, spec.count)
    signed = spec.point is None and spec.rtype.value.startswith("s")
    bits = 16 * words
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    names: dict[str, int] = {}
    for key, meaning in mapping.items():
        if spec.bits is not None and not 0 <= key < 16 * words:
            raise ValueError(f"bits.{key}: bit outside 0..{16 * words - 1}")
        if spec.enum is not None and not lo <= key <= hi:
            raise ValueError(f"enum.{key}: value outside {spec.rtype.value} {lo}..{hi}")
        if meaning.name in names:
            raise ValueError(
                f"{what}.{key}: name {meaning.name!r} already given to {names[meaning.name]}"
            )
        names[meaning.name] = key


def check_write_values(profile: Profile, by_name: dict[str, RegisterSpec]) -> None:
    """Literal values (safe mode...) fit their register; power registers carry the rating;
    a function code fits the register written."""
    for aname, act in profile.actions.items():
        for i, step in enumerate(act.writes):
            spec = by_name[step.register]
            where = f"actions.{aname.value}.writes.{i}"
            if step.function == 6 and spec.address is not None and register_words(spec) != 1:
                raise ValueError(
                    f"{where}.function: function 6 writes one register; {spec.name} has "
                    f"{register_words(spec)} (use 16)"
                )
            if step.value is not None and not isinstance(step.value, str):
                v = step.value
                if (spec.min is not None and v < spec.min) or (
                    spec.max is not None and v > spec.max
                ):
                    raise ValueError(
                        f"{where}.value: {v:g} outside register {spec.name}'s range "
                        f"[{spec.min}, {spec.max}]"
                    )
                if spec.address is not None and spec.scale_factor is None:
                    try:
                        encode_register(spec, v, transport=profile.transport)
                    except EncodeError as exc:
                        raise ValueError(f"{where}.value: {exc}") from None
            ratings = profile.power_ratings(step.param)
            wanted = _quotient_unit(profile, step.divide_by, where) if ratings else "W"
            if ratings and base_unit(spec.unit) != wanted:
                per = f" per {step.divide_by} ({wanted})" if step.divide_by else ""
                raise ValueError(
                    f"{where}.param: {step.param} is a power in W{per}, but register "
                    f"{spec.name} holds {spec.unit or 'a plain number'}"
                )
            if step.divide_by is not None and step.param is None:
                raise ValueError(f"{where}.divide_by: only a parameter is divided")
            if (
                ratings
                and step.divide_by is None
                and spec.address is not None
                and (spec.scale_factor is None)
            ):
                problem = write_scale_problem(spec, ratings, transport=profile.transport)
                if problem is not None:
                    raise ValueError(f"registers.{spec.name}.scale: {problem} ({where})")


def _quotient_unit(profile: Profile, divisor: str | None, where: str) -> str:
    """The unit of a power (W) divided by the field ``divisor``: A per V, ratio per W."""
    if divisor is None:
        return "W"
    reg = profile.fields.get(divisor)
    if reg is None:
        raise ValueError(f"{where}.divide_by: {divisor!r} is not a field mapped to a register")
    quotient = {"V": "A", "W": "ratio"}.get(base_unit(profile.register(reg).unit))
    if quotient is None:
        raise ValueError(f"{where}.divide_by: {divisor} must be in V (giving A) or W (giving %)")
    return quotient


def check_extensions(profile: Profile) -> None:
    """The schema-2 constructs: derivations, stacks, on-change writes, and their version."""
    _check_version(profile)
    _check_derived(profile)
    _check_batteries(profile)
    _check_on_change(profile)


def _check_version(profile: Profile) -> None:
    if profile.schema_version >= 2:
        return
    need = "needs schema: 2"
    for r in profile.registers:
        for attr in ("enum", "bits", "byte_order", "word_order"):
            if getattr(r, attr) is not None:
                raise ValueError(f"registers.{r.name}.{attr}: {need}")
    for dname, d in profile.derived.items():
        if d.sum is None:
            raise ValueError(f"derived.{dname}: only a sum is schema 1; this form {need}")
    for aname, act in profile.actions.items():
        if act.write != "always":
            raise ValueError(f"actions.{aname.value}.write: {need}")
        for i, step in enumerate(act.writes):
            if step.function is not None or step.divide_by is not None:
                what = "function" if step.function is not None else "divide_by"
                raise ValueError(f"actions.{aname.value}.writes.{i}.{what}: {need}")
    if profile.batteries:
        raise ValueError(f"batteries: {need}")


def _check_derived(profile: Profile) -> None:
    known = set(profile.fields)
    for dname, d in profile.derived.items():
        where = f"derived.{dname}"
        if dname in profile.fields:
            raise ValueError(f"{where}: already a field mapped to a register")
        for term in d.inputs():
            if term not in known:
                raise ValueError(
                    f"{where}.{term}: no field named {term!r} (fields, or derivations above)"
                )
        for cond in d.conditions():
            reg = profile.fields.get(cond.field)
            if reg is None:
                raise ValueError(
                    f"{where}: condition on {cond.field!r}, which is not a field mapped to a "
                    "register"
                )
            spec = profile.register(reg)
            if spec.point is None and spec.rtype not in _INTEGER_TYPES:
                raise ValueError(f"{where}: condition on {cond.field!r}, not an integer register")
        if d.unit is not None and d.unit not in _BASE_UNITS:
            raise ValueError(
                f"{where}.unit: {d.unit!r} is not a base unit "
                f"({', '.join(sorted(u for u in _BASE_UNITS if u))})"
            )
        known.add(dname)


def _check_batteries(profile: Profile) -> None:
    if not profile.batteries:
        return
    provided = set(profile.fields) | set(profile.derived)
    ids: set[str] = set()
    for i, stack in enumerate(profile.batteries):
        if stack.id in ids:
            raise ValueError(f"batteries.{i}.id: {stack.id!r} given twice")
        ids.add(stack.id)
        for attr in ("soc", "power_w"):
            name = getattr(stack, attr)
            if name not in provided:
                raise ValueError(f"batteries.{i}.{attr}: no field named {name!r}")
    total = sum(s.capacity_wh for s in profile.batteries)
    rated = profile.ratings.capacity_wh
    if rated > 0 and abs(total - rated) > 0.01 * rated:
        raise ValueError(
            f"batteries: the stacks hold {total:g} Wh, ratings.capacity_wh says {rated:g} Wh"
        )


def _check_on_change(profile: Profile) -> None:
    timeout = profile.behaviour.setpoint_timeout_s
    for aname, act in profile.actions.items():
        if act.write != "on_change":
            continue
        where = f"actions.{aname.value}"
        if aname.value == "heartbeat":
            raise ValueError(f"{where}.write: a heartbeat must be written every time")
        assert act.refresh_s is not None
        if timeout is not None and act.refresh_s > timeout / 3:
            raise ValueError(
                f"{where}.refresh_s: {act.refresh_s:g} s, but the device drops a setpoint not "
                f"refreshed within {timeout:g} s (behaviour.setpoint_timeout_s): use at most "
                f"{timeout / 3:g} s"
            )
