"""Pieces of the profile schema (``schema: 2``) that :mod:`drivers.profile` assembles.

- :class:`StateValue` and :class:`Severity`: what a value of a state register (``enum:``) or a
  bit of an alarm register (``bits:``) means, and how bad it is. Only ``fault`` faults the
  device; ``warning`` is reported; ``info`` is a normal state (Sungrow's "running" 0x0040).
- :class:`Derivation`: a field computed from others (a sum, a product, a sign taken from a
  status bit, or one of two fields chosen by a condition).
- :class:`BatteryStack`: one of several batteries behind one inverter or endpoint.
- :class:`Simulation`: the ``simulation`` section, how hil_sim's simulated unit of the profile
  behaves (below).
- :class:`Strict` and :data:`Identifier`: the base and the name type every model uses.

Validation errors name the dotted field path; the loader puts the file name in front.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Identifier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class Strict(BaseModel):
    """Unknown keys refused, frozen; allow_inf_nan=False: every number in a profile is finite
    (``.inf``/``.nan`` refused)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


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


# The ``simulation`` section of a profile: how hil_sim's simulated unit of it behaves.
#
# Everything a simulated unit does is read from the profile: its actions say how commands,
# limits, timers and safe mode work (:mod:`hil_sim.devices.storage`), and ``behaviour``
# declares what the actions cannot say. Nothing is inferred from vendor names or register
# contents.
#
# ``behaviour.model``: ``storage`` (the actions' semantics only), ``sunspec`` (the SunSpec
# 704/802/713 rules: reversion to ``WSetRvrt``, ``WSetRvrtRem`` count-down, 802 state and
# events, battery heartbeat; needs ``driver: sunspec``) or ``portable`` (a power station that
# charges from the site at its AC charge limit while plugged in and may be taken away).


class StatusRegister(Strict):
    """A status register (``register:``) the simulated unit keeps, in the register's own
    values: the first of these that holds (fault, then external control, then the power's
    sense)."""

    target: Identifier = Field(alias="register")
    fault: float
    external_control: float | None = Field(
        None, description="while a refreshed power setpoint is held; else by the power's sense"
    )
    discharging: float
    charging: float
    idle: float


class Gate(Strict):
    """A register (``register:``) whose values block a direction (an operating mode, a
    "disable charge" flag).

    A gate acts as a cap, never as part of a command: the literal writes of
    ``set_active_power`` to it do not decide which command the registers hold.
    """

    target: Identifier = Field(alias="register")
    no_charge: tuple[float, ...] = ()
    no_discharge: tuple[float, ...] = ()


class SimulatedBehaviour(Strict):
    """What the simulated unit does beyond what the profile's actions say."""

    model: Literal["storage", "sunspec", "portable"] = "storage"
    power_on: dict[Identifier, float] = Field(
        default_factory=dict, description="register -> value (register units) at power-on"
    )
    gates: tuple[Gate, ...] = ()
    status: StatusRegister | None = None
    power_through: Identifier | None = Field(
        None,
        description="the term of a derived power_w that carries the battery power both ways "
        "(the other terms read 0); by default the term whose sign matches the power",
    )

    def registers(self) -> list[tuple[str, str]]:
        """(dotted path, register name) of every register this names."""
        out = [(f"power_on.{r}", r) for r in self.power_on]
        out += [(f"gates.{i}.register", g.target) for i, g in enumerate(self.gates)]
        if self.status is not None:
            out.append(("status.register", self.status.target))
        return out


class Simulation(Strict):
    """Parameters of the simulated unit served by hil_sim from this profile."""

    initial_soc: float = Field(0.5, ge=0, le=1)
    self_discharge_per_day: float = Field(0.001, ge=0, le=0.1)
    taper_soc: float = Field(0.1, ge=0, le=0.5, description="SoC band near 0 and 1 that tapers")
    ambient_c: float = 25.0
    thermal_capacity_j_per_k: float = Field(200_000.0, gt=0)
    thermal_resistance_k_per_w: float = Field(0.02, gt=0)
    derate_start_c: float = 45.0
    trip_c: float = 60.0
    battery_voltage_v: float = Field(51.2, gt=0, description="DC bus voltage it reports")
    behaviour: SimulatedBehaviour = SimulatedBehaviour()
