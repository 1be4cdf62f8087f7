"""Typed configuration of EV charging: the OCPP central system (``[ocpp]``) and the chargers
(``[[chargers]]``) it controls, and the battery-swap station (``[swap_station]``). Part of
:class:`essd.config.Settings`.

Units: power in W, current in A (per phase), voltage in V, times in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


def connector_key(charger_id: str, connector_id: int) -> str:
    """The id essd uses for a charger's connector: the charger id, ``id:N`` from the 2nd on."""
    return charger_id if connector_id == 1 else f"{charger_id}:{connector_id}"


ChargerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ChargerConfig(_Section):
    """One charger (charge point / charging station) that connects to essd over OCPP."""

    id: ChargerId = Field(description="The charge point identity (last path segment of its URL)")
    password: SecretStr | None = Field(
        None, description="HTTP basic auth password (OCPP security profile 1/2); none: no auth"
    )
    rate_unit: Literal["W", "A"] = Field(
        "A", description="Unit the charger takes schedule limits in; A is per phase"
    )
    connectors: Annotated[int, Field(ge=1, le=8)] = Field(
        1, description="Connectors (1.6) or EVSEs (2.0.1) that charge at the same time"
    )
    phases: Annotated[int, Field(ge=1, le=3)] = 3
    voltage_v: Annotated[float, Field(gt=0.0, le=1000.0)] = 230.0
    max_power_w: Annotated[float, Field(gt=0.0, le=1_000_000.0)] = 11_000.0
    min_power_w: Annotated[float, Field(ge=0.0, le=1_000_000.0)] = Field(
        0.0, description="Least power the charger runs at while charging (e.g. 6 A x phases)"
    )
    initial_limit_w: Annotated[float, Field(ge=0.0, le=1_000_000.0)] | None = Field(
        0.0,
        description="Limit sent the moment a transaction starts, until the next cycle plans"
        " the session (0: wait; none: leave the charger at its own default meanwhile)",
    )
    default_energy_wh: Annotated[float, Field(ge=0.0, le=1_000_000.0)] = Field(
        20_000.0, description="Energy asked for a session nobody gave a request for"
    )
    default_dwell_s: Annotated[float, Field(gt=0.0, le=7 * 86_400.0)] = Field(
        8 * 3600.0, description="Stay assumed before a departure is requested or learned"
    )

    @property
    def connector_ids(self) -> tuple[str, ...]:
        """essd's id of each connector (see :func:`connector_key`)."""
        return tuple(connector_key(self.id, n) for n in range(1, self.connectors + 1))

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_power_w > self.max_power_w:
            raise ValueError("min_power_w: must not exceed max_power_w")
        return self


class OcppConfig(_Section):
    """The local OCPP central system (a WebSocket server the chargers connect to)."""

    host: str = Field("127.0.0.1", description="Listen address; loopback unless set")
    port: Annotated[int, Field(ge=0, le=65535)] = 9000
    protocols: tuple[Literal["ocpp1.6", "ocpp2.0.1"], ...] = ("ocpp2.0.1", "ocpp1.6")
    cert_file: Path | None = Field(None, description="TLS server certificate (PEM): wss://")
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM)")
    heartbeat_interval_s: Annotated[int, Field(ge=10, le=86_400)] = 60
    profile_validity_s: Annotated[float, Field(ge=30.0, le=3600.0)] = Field(
        300.0,
        description="A charging profile expires this long after it was sent unless renewed;"
        " then the charger falls back to its default limit",
    )
    response_timeout_s: Annotated[float, Field(gt=0.0, le=120.0)] = 10.0
    allow_unknown_chargers: bool = Field(
        False, description="Accept charge points not listed in [[chargers]]"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("key_file: give both cert_file and key_file, or neither")
        if not self.protocols:
            raise ValueError("protocols: at least one OCPP version")
        return self


class SwapStationConfig(_Section):
    """A battery-swap station: packs in charging slots, each slot a device (a rack BMS slot
    charger: it reads the docked pack's SoC and takes a charge limit) that essd plans as a
    flexible load, not as a site battery. ``service_level`` charged packs (SoC >=
    ``target_soc``) are kept ready at every step for the swaps the demand forecast expects."""

    slots: tuple[str, ...] = Field(description="Device ids of the slot chargers, one pack each")
    service_level: Annotated[int, Field(ge=0)] = Field(
        description="Charged packs that must be ready at every step (k)"
    )
    target_soc: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.95, description="SoC at which a pack counts as charged"
    )
    arrival_soc: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.2, description="SoC a swapped-in (depleted) pack usually arrives with"
    )
    pack_capacity_wh: Annotated[float, Field(gt=0.0, le=10_000_000.0)] | None = Field(
        None, description="Energy of one pack; none: each slot device's capacity"
    )
    demand: Literal["learned", "series"] = Field(
        "learned", description="Swap forecast: learned per hour of the day, or a series file"
    )
    demand_prior_per_hour: Annotated[float, Field(ge=0.0, le=10_000.0)] = Field(
        1.0, description="Swaps per hour assumed for an hour not learned yet"
    )
    demand_weight: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.2, description="EWMA weight of each hour's swap count in the learned demand"
    )
    demand_series_file: Path | None = Field(
        None, description="CSV with columns time and swaps_per_hour (demand = series)"
    )
    demand_margin: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        0.0, description="Plan for this share more swaps than expected"
    )
    demand_z: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        2.33, description="Plus this many standard deviations of a Poisson count (2.33: 99 %)"
    )
    swap_drop_soc: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.3, description="A charged pack's SoC falling this much between two reads is a swap"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.slots:
            raise ValueError("slots: at least one slot device")
        dup = sorted({s for s in self.slots if self.slots.count(s) > 1})
        if dup:
            raise ValueError(f"slots: device {dup[0]!r} listed twice")
        if self.service_level > len(self.slots):
            raise ValueError(
                f"service_level: {self.service_level} charged packs cannot be kept in "
                f"{len(self.slots)} slots"
            )
        if self.arrival_soc >= self.target_soc:
            raise ValueError("arrival_soc: must be below target_soc")
        if self.demand == "series" and self.demand_series_file is None:
            raise ValueError("demand_series_file: required when demand is 'series'")
        return self
