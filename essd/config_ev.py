"""Typed configuration of EV charging: the OCPP central system (``[ocpp]``) and the chargers
(``[[chargers]]``) it controls. Part of :class:`essd.config.Settings`.

Units: power in W, current in A (per phase), voltage in V, times in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["ChargerConfig", "OcppConfig", "connector_key"]


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
