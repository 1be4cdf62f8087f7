"""HIL scenarios for EV charging and battery-swap stations (``profiles/scenarios/ev/*.yaml``):
a strict pydantic schema and a loader whose errors name the file and the field.

Times inside a scenario are hours from its ``start`` (a local midnight); hourly profiles have 24
values, for the local hours 0..23. Units: W, Wh, SoC ratio, prices per kWh.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

Finite = Annotated[float, Field(allow_inf_nan=False)]
Hourly = Annotated[list[Finite], Field(min_length=24, max_length=24)]
PosW = Annotated[float, Field(gt=0.0, le=10_000_000.0, allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0.0, le=10_000_000.0, allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SiteSpec(_Model):
    """The site around the chargers: connection, load, PV, tariff."""

    import_limit_w: PosW
    export_limit_w: NonNeg = 0.0
    load_w: Hourly
    pv_peak_w: NonNeg = 0.0
    import_price: Hourly
    export_price: float = Field(0.0, allow_inf_nan=False)
    battery_capacity_wh: NonNeg = 0.0
    battery_power_w: NonNeg = 0.0
    battery_soc: Ratio = 0.5


class ChargerSpec(_Model):
    """One simulated OCPP charger."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    version: Literal["1.6", "2.0.1"] = "1.6"
    rate_unit: Literal["W", "A"] = "A"
    phases: Annotated[int, Field(ge=1, le=3)] = 3
    max_power_w: PosW = 11_000.0
    min_power_w: NonNeg = 0.0


class VehicleSpec(_Model):
    """One vehicle's visit: charger, hours from the start, what it asks for."""

    charger: str
    arrive_h: NonNeg
    leave_h: PosW
    energy_wh: NonNeg
    capacity_wh: PosW = 60_000.0
    soc: Ratio = 0.3
    max_power_w: PosW = 11_000.0
    tell_departure: bool = Field(True, description="The user sends cmd/session at arrival")

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.leave_h <= self.arrive_h:
            raise ValueError("leave_h: must be after arrive_h")
        if self.soc * self.capacity_wh + self.energy_wh > self.capacity_wh:
            raise ValueError("energy_wh: more than fits in the battery")
        return self


class SwapSpec(_Model):
    """A swap station: slots, packs, the swap arrival process and the service level."""

    slots: Annotated[int, Field(ge=1, le=200)]
    pack_capacity_wh: PosW
    slot_power_w: PosW
    service_level: Annotated[int, Field(ge=0)]
    target_soc: Ratio = 0.9
    arrival_soc: tuple[Ratio, Ratio] = (0.1, 0.3)
    swaps_per_hour: Hourly
    demand: Literal["series", "learned"] = "series"
    demand_margin: NonNeg = 0.0
    demand_z: Annotated[float, Field(ge=0.0, le=10.0)] = 2.33
    seed: int = 19


class EvScenario(_Model):
    """One EV / swap-station HIL scenario."""

    name: str
    description: str = ""
    start: AwareDatetime
    duration_h: Annotated[float, Field(gt=0.0, le=24.0 * 31)]
    cycle_s: Annotated[float, Field(ge=60.0, le=3600.0)] = 300.0
    step_s: Annotated[float, Field(ge=300.0, le=3600.0)] = 900.0
    horizon_steps: Annotated[int, Field(ge=4, le=672)] = 96
    site: SiteSpec
    chargers: tuple[ChargerSpec, ...] = ()
    vehicles: tuple[VehicleSpec, ...] = ()
    swap: SwapSpec | None = None
    expect: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ids = {c.id for c in self.chargers}
        for k, v in enumerate(self.vehicles):
            if v.charger not in ids:
                raise ValueError(f"vehicles.{k}.charger: no charger {v.charger!r}")
        by_charger: dict[str, list[VehicleSpec]] = {}
        for v in self.vehicles:
            by_charger.setdefault(v.charger, []).append(v)
        for cid, visits in by_charger.items():
            visits.sort(key=lambda v: v.arrive_h)
            for a, b in pairwise(visits):
                if b.arrive_h < a.leave_h:
                    raise ValueError(f"vehicles: two vehicles on {cid} at once")
        if (self.swap is None) == (not self.chargers):
            raise ValueError("chargers: give chargers (with vehicles) or a swap station")
        return self


class EvScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


def load_ev_scenario(path: Path) -> EvScenario:
    """Read and validate one scenario file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvScenarioError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise EvScenarioError(f"{path}: not valid YAML ({exc})") from None
    try:
        return EvScenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "scenario"
        raise EvScenarioError(f"{path}: {loc}: {err['msg']}") from None
