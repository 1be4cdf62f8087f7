"""Device profiles: the YAML schema that both the drivers and the simulator read.

A profile maps registers to typed, named fields and each control action to an ordered list of
register writes. Adding a device is adding a YAML file under ``profiles/devices/``; no code.
Validation errors name the file and the dotted field path.

Loading (YAML, size limits, the cache, finding a profile by name) is
:mod:`drivers.profile_loader`.

Register references come in two kinds:
- ``address`` (+ ``type``/``scale``/...): a plain vendor register map;
- ``point: "<model>.<point>"``: a SunSpec point, located at run time by model discovery and
  typed from the SunSpec model definitions (pysunspec2), never from hand-typed offsets.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from drivers.layout import unit_problem
from drivers.profile_checks import check_extensions, check_states, check_write_values
from drivers.profile_parts import (
    BatteryStack,
    Derivation,
    Identifier,
    Severity,
    Simulation,
    StateValue,
    Strict,
)
from drivers.registers import ByteOrder, RegisterType, Table, word_count
from essd.domain import DeviceClass

# 1: the original schema. 2 adds state maps (enum/bits with severities), derivations beyond
# sums, per-register byte/word order, the write function code, on-change writes, battery
# stacks, and checked units. Every schema-1 profile is a valid schema-2 profile.
SCHEMA_VERSIONS = (1, 2)


SunSpecPoint = Annotated[str, Field(pattern=r"^[0-9]+\.[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]


class Capability(StrEnum):
    """What a device can do. The optimizer and the safety supervisor work from these."""

    READ_STATE = "read_state"  # SoC and battery power (fields soc, power_w)
    ACTIVE_POWER = "active_power"  # set_active_power(power_w), both directions
    CHARGE_LIMIT = "charge_limit"  # set_charge_limit(charge_w): e.g. a portable AC charge rate
    DISCHARGE_LIMIT = "discharge_limit"  # set_discharge_limit(discharge_w)
    LIVE_LIMITS = "live_limits"  # reports live BMS limits (fields max_charge_w, max_discharge_w)
    OUTPUT_SWITCH = "output_switch"  # enable_output / disable_output
    HEARTBEAT = "heartbeat"  # heartbeat(counter): the device reverts when it stops
    REVERT_TIMER = "revert_timer"  # configure_revert_timer(seconds)
    SAFE_MODE = "safe_mode"  # safe_mode: the device's own safe state
    SOC_LIMITS = "soc_limits"  # set_soc_limits(min_soc, max_soc)
    AVAILABILITY = "availability"  # may disappear (unplugged): no answer is not a fault
    GRID_METER = "grid_meter"  # field grid_power_w (> 0 imports)


class ActionName(StrEnum):
    """Control actions a profile can define as register writes."""

    SET_ACTIVE_POWER = "set_active_power"
    SET_CHARGE_LIMIT = "set_charge_limit"
    SET_DISCHARGE_LIMIT = "set_discharge_limit"
    ENABLE_OUTPUT = "enable_output"
    DISABLE_OUTPUT = "disable_output"
    HEARTBEAT = "heartbeat"
    CONFIGURE_REVERT_TIMER = "configure_revert_timer"
    SAFE_MODE = "safe_mode"
    SET_SOC_LIMITS = "set_soc_limits"


# Parameters the driver supplies to each action; a write step may use only these.
ACTION_PARAMS: dict[ActionName, frozenset[str]] = {
    # power_w: battery sign (> 0 discharges); charge_w/discharge_w/abs_w: magnitudes >= 0;
    # duration_s: how long the device should hold the command (the setpoint TTL).
    ActionName.SET_ACTIVE_POWER: frozenset(
        {"power_w", "charge_w", "discharge_w", "abs_w", "duration_s"}
    ),
    ActionName.SET_CHARGE_LIMIT: frozenset({"charge_w"}),
    ActionName.SET_DISCHARGE_LIMIT: frozenset({"discharge_w"}),
    ActionName.ENABLE_OUTPUT: frozenset(),
    ActionName.DISABLE_OUTPUT: frozenset(),
    ActionName.HEARTBEAT: frozenset({"counter"}),
    ActionName.CONFIGURE_REVERT_TIMER: frozenset({"seconds"}),
    ActionName.SAFE_MODE: frozenset(),
    ActionName.SET_SOC_LIMITS: frozenset({"min_soc", "max_soc"}),
}


# Power parameters (W) of the write actions, and which ratings bound each: the signed values
# a register written from that parameter must be able to carry.
POWER_PARAMS: dict[str, tuple[Literal["charge", "discharge"], ...]] = {
    "power_w": ("charge", "discharge"),  # < 0 charging, > 0 discharging
    "charge_w": ("charge",),
    "discharge_w": ("discharge",),
    "abs_w": ("charge", "discharge"),
}


# Fields each capability needs the profile to map.
CAPABILITY_FIELDS: dict[Capability, frozenset[str]] = {
    Capability.READ_STATE: frozenset({"soc", "power_w"}),
    Capability.LIVE_LIMITS: frozenset({"max_charge_w", "max_discharge_w"}),
    Capability.GRID_METER: frozenset({"grid_power_w"}),
}


CAPABILITY_ACTIONS: dict[Capability, ActionName] = {
    Capability.ACTIVE_POWER: ActionName.SET_ACTIVE_POWER,
    Capability.CHARGE_LIMIT: ActionName.SET_CHARGE_LIMIT,
    Capability.DISCHARGE_LIMIT: ActionName.SET_DISCHARGE_LIMIT,
    Capability.HEARTBEAT: ActionName.HEARTBEAT,
    Capability.REVERT_TIMER: ActionName.CONFIGURE_REVERT_TIMER,
    Capability.SAFE_MODE: ActionName.SAFE_MODE,
    Capability.SOC_LIMITS: ActionName.SET_SOC_LIMITS,
}


class Transport(Strict):
    """Transport defaults; a site config may override host/port/unit."""

    framing: Literal["tcp", "rtu"] = "tcp"
    unit: int = Field(1, ge=0, le=247)
    port: int = Field(502, ge=1, le=65535)
    byte_order: ByteOrder = ByteOrder.BIG
    word_order: ByteOrder = ByteOrder.BIG
    baudrate: int = Field(9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    max_registers_per_read: int = Field(100, ge=1, le=125)
    # Unmapped registers a block read may span; 0 reads contiguous runs only, because many
    # devices answer ILLEGAL_DATA_ADDRESS for reserved addresses inside a block.
    read_gap_max: int = Field(0, ge=0, le=124)
    # Consecutive write steps of one action on adjacent registers may go as one function-16
    # request (the device documents "write multiple registers" over them); off: one request
    # per step.
    merge_writes: bool = False


class RegisterSpec(Strict):
    """One register (or SunSpec point).

    The physical value is ``raw * scale * 10**sf + offset`` (``sf`` read from
    ``scale_factor`` register, else 0). ``min``/``max`` bound the physical value: a reading
    outside is INVALID, a write outside is refused. ``not_implemented`` lists raw values that
    mean "no value" (SunSpec 0x8000/0xFFFF...).
    """

    name: Identifier
    vendor_name: str = Field(min_length=1, description="The vendor document's own name for it")
    address: int | None = Field(None, ge=0, le=65535)
    point: SunSpecPoint | None = None
    table: Table = Table.HOLDING
    type: RegisterType | None = None
    count: int | None = Field(None, ge=1, le=64, description="Words, for strings")
    scale: float = 1.0
    scale_factor: Identifier | None = None
    offset: float = 0.0
    unit: str = ""
    access: Literal["r", "rw", "w"] = "r"
    min: float | None = None
    max: float | None = None
    not_implemented: tuple[int, ...] = ()
    description: str = ""
    # Read back after a write; false only for trigger registers the device clears itself.
    verify: bool = True
    # schema 2: this register's own byte/word order where it differs from the device's.
    byte_order: ByteOrder | None = None
    word_order: ByteOrder | None = None
    # schema 2: a state register (raw value -> meaning) or an alarm register (bit -> meaning);
    # a value or set bit not listed has severity ``unlisted``.
    enum: dict[int, StateValue] | None = None
    bits: dict[int, StateValue] | None = None
    unlisted: Severity = Severity.WARNING

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.address is None) == (self.point is None):
            raise ValueError("exactly one of 'address' or 'point' must be given")
        if self.address is not None:
            rtype = self.type or RegisterType.U16
            if rtype is RegisterType.STRING and self.count is None:
                raise ValueError("count: required for a string register")
            if self.address + word_count(rtype, self.count) > 0x10000:
                raise ValueError("address: register runs past 65535")
        if self.scale == 0:
            raise ValueError("scale: must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min: greater than max")
        if self.table is Table.INPUT and self.access != "r":
            raise ValueError("access: input registers are read-only")
        problem = unit_problem(self.unit)
        if problem is not None:
            raise ValueError(f"unit: {problem}")
        if self.point is not None and (self.byte_order or self.word_order):
            raise ValueError("word_order: a SunSpec point is big-endian by definition")
        check_states(self)
        return self

    @property
    def rtype(self) -> RegisterType:
        """Register type (u16 when not given for a plain register)."""
        return self.type or RegisterType.U16


class WriteStep(Strict):
    """One register write of an action: a literal ``value`` or a named ``param``.

    ``when`` restricts the step to the sign of ``power_w`` for set_active_power (charge < 0,
    discharge > 0, idle == 0); other actions use ``always``.
    """

    target: Identifier = Field(alias="register")
    value: float | str | None = None
    param: Identifier | None = None
    when: Literal["always", "charge", "discharge", "idle"] = "always"
    # schema 2: Modbus function code of the write. None: 6 for one register, 16 for several;
    # 16 for devices that refuse 6 even for one register (Deye-style), 6 only for one word.
    function: Literal[6, 16] | None = None
    # schema 2: the parameter is divided by this field's live value (base units) before it is
    # written: W / V = A for devices controlled by a current, W / W = ratio for a percentage.
    divide_by: Identifier | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.value is None) == (self.param is None):
            raise ValueError("exactly one of 'value' or 'param' must be given")
        return self

    @property
    def register(self) -> str:
        """Name of the register written (``register:`` in YAML)."""
        return self.target


class Action(Strict):
    """An ordered list of register writes that performs one control action."""

    description: str = ""
    writes: tuple[WriteStep, ...] = Field(min_length=1)
    # schema 2: ``on_change`` skips a step whose register already holds what it would write
    # (as last written and read back), but rewrites it every ``refresh_s`` all the same: for
    # devices whose setpoint holds and whose flash wears.
    write: Literal["always", "on_change"] = "always"
    refresh_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_refresh(self) -> Self:
        if self.write == "on_change" and self.refresh_s is None:
            raise ValueError("refresh_s: required with write: on_change")
        if self.write == "always" and self.refresh_s is not None:
            raise ValueError("refresh_s: only with write: on_change")
        return self


class Ratings(Strict):
    """Nameplate ratings; live limits from the BMS and the config can only tighten them."""

    capacity_wh: float = Field(0.0, ge=0)
    max_charge_w: float = Field(0.0, ge=0)
    max_discharge_w: float = Field(0.0, ge=0)
    charge_efficiency: float = Field(0.95, gt=0, le=1)
    discharge_efficiency: float = Field(0.95, gt=0, le=1)


class Behaviour(Strict):
    """How the device acts when essd stops talking to it.

    ``setpoint_timeout_s``: the device drops a power command not refreshed within this time
    (a revert timer, configurable or fixed); essd refreshes at most every timeout/3.
    ``heartbeat_timeout_s``: the device reverts to safe mode when the heartbeat stops.
    """

    setpoint_timeout_s: float | None = Field(None, gt=0)
    revert_timer_configurable: bool = False
    heartbeat_timeout_s: float | None = Field(None, gt=0)
    safe_description: str = "0 W"
    # What the public map leaves unknown (e.g. "whether forced mode reverts"); the simulator
    # models the conservative case (a command without a documented timeout is held forever).
    unknown: str = ""


class SunSpecLayout(Strict):
    """Where SunSpec discovery looks, and which models the device carries (in order)."""

    base_addresses: tuple[int, ...] = (40000, 0, 50000)
    models: tuple[int, ...] = Field(min_length=1)


# Profile.register's index: a profile's registers by name, keyed by the id of its register
# tuple (held, so the id stays its own).
_BY_NAME: dict[int, tuple[tuple[RegisterSpec, ...], dict[str, RegisterSpec]]] = {}


class Profile(Strict):
    """A device profile (``schema: 1`` or ``2``; see :data:`SCHEMA_VERSIONS`)."""

    schema_version: Literal[1, 2] = Field(1, alias="schema")
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$", max_length=64)]
    description: str = Field(min_length=1)
    device_class: DeviceClass
    source: str = Field(min_length=1, description="The public vendor document it follows")
    transport: Transport = Transport()
    driver: Literal["generic", "sunspec"] = "generic"
    sunspec: SunSpecLayout | None = None
    capabilities: tuple[Capability, ...] = Field(min_length=1)
    ratings: Ratings = Ratings()
    behaviour: Behaviour = Behaviour()
    simulation: Simulation = Simulation()
    registers: tuple[RegisterSpec, ...] = Field(min_length=1)
    fields: dict[Identifier, Identifier] = Field(
        default_factory=dict, description="semantic field -> register name"
    )
    # A field computed from others, in base units (W...), for devices that do not report it:
    # e.g. a power station's battery power = outputs - inputs. Evaluated in order; a
    # derivation may use fields and the derivations above it.
    derived: dict[Identifier, Derivation] = Field(
        default_factory=dict, description="field -> derivation (schema 1: {field: coefficient})"
    )
    actions: dict[ActionName, Action] = Field(default_factory=dict)
    # schema 2: several batteries behind this endpoint, each with its own SoC and power field.
    batteries: tuple[BatteryStack, ...] = ()

    @model_validator(mode="after")
    def _check_registers(self) -> Self:
        names = [r.name for r in self.registers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"registers: duplicate name(s) {', '.join(dup)}")
        by_name = {r.name: r for r in self.registers}
        if self.driver == "sunspec" and self.sunspec is None:
            raise ValueError("sunspec: required when driver is 'sunspec'")
        for r in self.registers:
            if r.point is not None and self.driver != "sunspec":
                raise ValueError(f"registers.{r.name}.point: only a sunspec profile has points")
            if r.scale_factor is not None and r.scale_factor not in by_name:
                raise ValueError(f"registers.{r.name}.scale_factor: no register {r.scale_factor!r}")
        for fname, reg in self.fields.items():
            if reg not in by_name:
                raise ValueError(f"fields.{fname}: no register named {reg!r}")
        check_extensions(self)
        return self

    @model_validator(mode="after")
    def _check_capabilities(self) -> Self:
        for cap in self.capabilities:
            missing = CAPABILITY_FIELDS.get(cap, frozenset()) - self.field_names()
            if missing:
                raise ValueError(
                    f"capabilities: {cap.value} needs fields {', '.join(sorted(missing))}"
                )
            needed = CAPABILITY_ACTIONS.get(cap)
            if needed is not None and needed not in self.actions:
                raise ValueError(f"capabilities: {cap.value} needs action {needed.value}")
        if Capability.OUTPUT_SWITCH in self.capabilities and not (
            {ActionName.ENABLE_OUTPUT, ActionName.DISABLE_OUTPUT} <= self.actions.keys()
        ):
            raise ValueError("capabilities: output_switch needs enable_output and disable_output")
        return self

    @model_validator(mode="after")
    def _check_actions(self) -> Self:
        by_name = {r.name: r for r in self.registers}
        for aname, act in self.actions.items():
            allowed = ACTION_PARAMS[aname]
            for i, step in enumerate(act.writes):
                where = f"actions.{aname.value}.writes.{i}"
                spec = by_name.get(step.register)
                if spec is None:
                    raise ValueError(f"{where}.register: no register named {step.register!r}")
                if spec.access == "r":
                    raise ValueError(f"{where}.register: {spec.name} is read-only")
                if step.param is not None and step.param not in allowed:
                    raise ValueError(
                        f"{where}.param: {step.param!r} is not a parameter of {aname.value} "
                        f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
                    )
                if step.when != "always" and aname is not ActionName.SET_ACTIVE_POWER:
                    raise ValueError(f"{where}.when: only set_active_power steps are conditional")
            if aname is ActionName.SET_ACTIVE_POWER:
                # Every sign must write something: a command that silently does nothing for
                # 0 W would leave the device charging or discharging.
                for sign in ("charge", "discharge", "idle"):
                    if not any(st.when in ("always", sign) for st in act.writes):
                        raise ValueError(
                            f"actions.set_active_power.writes: nothing is written when {sign}"
                        )
        check_write_values(self, by_name)
        return self

    @model_validator(mode="after")
    def _check_ratings(self) -> Self:
        if self.device_class is DeviceClass.METER:
            return self
        # A capacity of 0 is allowed here: the site configuration may give it (capacity_wh).
        r = self.ratings
        charges = self.has(Capability.ACTIVE_POWER) or self.has(Capability.CHARGE_LIMIT)
        discharges = self.has(Capability.ACTIVE_POWER) or self.has(Capability.DISCHARGE_LIMIT)
        if charges and r.max_charge_w <= 0:
            raise ValueError("ratings.max_charge_w: must be > 0 for a device essd charges")
        if discharges and r.max_discharge_w <= 0:
            raise ValueError("ratings.max_discharge_w: must be > 0 for a device essd discharges")
        return self

    @model_validator(mode="after")
    def _check_simulation(self) -> Self:
        b = self.simulation.behaviour
        names = {r.name for r in self.registers}
        for where, reg in b.registers():
            if reg not in names:
                raise ValueError(f"simulation.behaviour.{where}: no register named {reg!r}")
        if b.model == "sunspec" and self.driver != "sunspec":
            raise ValueError("simulation.behaviour.model: sunspec needs driver: sunspec")
        power = self.derived.get("power_w")
        terms = power.sum if power is not None and power.sum is not None else {}
        if b.power_through is not None and b.power_through not in terms:
            raise ValueError(
                f"simulation.behaviour.power_through: {b.power_through!r} is not a term of "
                "derived power_w"
            )
        return self

    @model_validator(mode="after")
    def _check_overlaps(self) -> Self:
        spans = sorted(
            (r.table.value, r.address, r.address + word_count(r.rtype, r.count), r.name)
            for r in self.registers
            if r.address is not None and not (r.rtype is RegisterType.STRING and not r.count)
        )
        for (ta, a0, a1, na), (tb, b0, b1, nb) in itertools.pairwise(spans):
            if ta == tb and b0 < a1:
                raise ValueError(
                    f"registers.{nb}.address: {tb} {b0}..{b1 - 1} overlaps register {na} "
                    f"({ta} {a0}..{a1 - 1})"
                )
        return self

    def power_ratings(self, param: str | None) -> list[float]:
        """The rated values (W, signed as the parameter) a power parameter reaches; [] for
        parameters that are not powers."""
        out = []
        for sense in POWER_PARAMS.get(param or "", ()):
            if sense == "charge":
                rating = self.ratings.max_charge_w
                out.append(-rating if param == "power_w" else rating)
            else:
                out.append(self.ratings.max_discharge_w)
        return out

    def register(self, name: str) -> RegisterSpec:
        """The register called ``name`` (KeyError naming it otherwise)."""
        regs = self.registers
        index = _BY_NAME.get(id(regs))
        if index is None or index[0] is not regs:
            index = _BY_NAME[id(regs)] = (regs, {r.name: r for r in regs})
        spec = index[1].get(name)
        if spec is None:
            raise KeyError(f"profile {self.name}: no register {name!r}")
        return spec

    def field_register(self, field: str) -> RegisterSpec | None:
        """The register mapped to a semantic field, or None when the profile has none."""
        reg = self.fields.get(field)
        return None if reg is None else self.register(reg)

    def field_names(self) -> set[str]:
        """Every field the profile provides: mapped, derived, and the stacks' aggregates."""
        names = set(self.fields) | set(self.derived)
        if self.batteries:
            names |= {"soc", "power_w"}
        return names

    def has(self, capability: Capability) -> bool:
        """True when the device has ``capability``."""
        return capability in self.capabilities


class ProfileError(ValueError):
    """A profile cannot be loaded; the message names the file and the field."""
