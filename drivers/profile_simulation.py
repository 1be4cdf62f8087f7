"""The ``simulation`` section of a profile: how hil_sim's simulated unit of it behaves.

Everything a simulated unit does is read from the profile: its actions say how commands,
limits, timers and safe mode work (:mod:`hil_sim.devices.storage`), and ``behaviour``
declares what the actions cannot say. Nothing is inferred from vendor names or register
contents.

``behaviour.model``: ``storage`` (the actions' semantics only), ``sunspec`` (the SunSpec
704/802/713 rules: reversion to ``WSetRvrt``, ``WSetRvrtRem`` count-down, 802 state and
events, battery heartbeat; needs ``driver: sunspec``) or ``portable`` (a power station that
charges from the site at its AC charge limit while plugged in and may be taken away).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drivers.profile_types import Identifier, Strict


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
