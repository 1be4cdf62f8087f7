"""Operator commands: payload models, limits, results and the daemon-side target protocol.

A command arrives as a name (``mode``, ``reserve``, ``setpoint``, ``prices``, ``forecast``) and
a JSON payload (bytes). :func:`essd.command_handling.handle_command` parses it with a strict
pydantic model (unknown keys, non-finite numbers, wrong lengths and out-of-range values are
refused), and only a fully valid command reaches the :class:`CommandTarget`. Every outcome is
a :class:`CommandResult` whose ``error`` names the field
(``"reserve_soc: Input should be less than or equal to 1"``); a refused command changes nothing.

Units and signs: power in W, **> 0 discharges into the site, < 0 charges**; SoC as a ratio
0..1; prices per kWh in the tariff currency; carbon intensity in g/kWh; times are epoch
seconds or ISO 8601 with a UTC offset; durations in seconds.

The transport (MQTT, a CLI) is not this module's business: :mod:`essd.mqtt` calls
:func:`~essd.command_handling.handle_command` for every message on ``cmd/<name>`` and publishes
the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol, Self, runtime_checkable

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

log = logging.getLogger(__name__)


Mode = Literal["auto", "manual", "standby"]


#: Longest accepted time series (a week of 5-minute steps); bounds memory and solve size.
MAX_SERIES_LENGTH = 2016


#: Largest accepted power magnitude in a command, W (a sanity bound, not a device limit:
#: the safety supervisor clamps to the live limits).
MAX_COMMAND_POWER_W = 100_000_000.0


#: Largest accepted JSON payload, bytes.
MAX_PAYLOAD_BYTES = 256 * 1024


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


#: Longest a manual setpoint may be held, s.
MAX_SETPOINT_S = 86_400.0


ECHO_ID = r"^[\x21-\x7e]{1,64}$"  # printable ASCII without spaces


EchoId = Annotated[str, Field(pattern=ECHO_ID)]


# pydantic parses ISO 8601 strings and epoch numbers alike; the schema says so.
Timestamp = Annotated[
    AwareDatetime,
    Field(strict=False),  # strings and numbers are how JSON carries times
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "description": "epoch seconds"},
            ]
        }
    ),
]


@dataclass(frozen=True, slots=True)
class CommandLimits:
    """What an operator command may ask for, beyond what the payload schema allows.

    ``None`` leaves a limit to the device (power) or to the schema (reserve).
    """

    max_manual_duration_s: float = MAX_SETPOINT_S
    max_manual_power_w: float | None = None
    min_reserve_soc: float | None = None


#: No limits beyond the payload schema.
NO_LIMITS = CommandLimits()


class CommandRejected(ValueError):
    """A command the target refuses on semantic grounds; the message is ``"field: reason"``.

    :func:`handle_command` treats any ``ValueError`` raised by a target the same way.
    """


@runtime_checkable
class CommandTarget(Protocol):
    """What the daemon implements so operator commands can reach it.

    Each method is called only with a fully validated command and either applies it or raises
    :class:`CommandRejected` (any ``ValueError``) with ``"field: reason"`` and applies nothing.
    Methods return promptly: they run on the event loop. Arguments are positional.
    """

    def set_mode(self, mode: str, /) -> None:
        """Switch to ``auto`` (optimizer), ``manual`` (operator setpoints) or ``standby``."""
        ...

    def set_reserve(self, reserve_soc: float, /) -> None:
        """Set the reserve SoC ratio 0..1 (refuse ``reserve_soc: ...`` at or above max SoC)."""
        ...

    def set_manual_setpoint(self, device_id: str, power_w: float, expires_at: float, /) -> None:
        """Hold ``power_w`` (> 0 discharges, < 0 charges) on a battery until epoch ``expires_at``.

        Only in manual mode (else ``mode: ...``); an unknown device is ``device: ...``. The
        safety supervisor still clamps the value.
        """
        ...

    def set_price_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float], /
    ) -> None:
        """Override ``import_price``/``export_price`` (per kWh) or ``carbon_g_per_kwh``.

        ``values[k]`` holds over ``[start + k*step_s, start + (k+1)*step_s)`` (epoch seconds);
        the built-in source takes over again after the last step.
        """
        ...

    def set_forecast_override(
        self, quantity: str, start: float, step_s: float, values: Sequence[float], /
    ) -> None:
        """Override the ``load_w`` or ``pv_w`` forecast (W >= 0), like the prices."""
        ...


class CommandResult(BaseModel):
    """The reply to one command, published on ``cmd/<name>/result`` (never retained)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool = Field(description="True when the command was applied")
    error: str = Field("", description='Empty when ok, else "field: reason"')
    id: str | None = Field(None, description="The command's own id, echoed when it gave one")

    def to_payload(self) -> bytes:
        """The JSON bytes sent on the result topic (``id`` omitted when absent)."""
        return self.model_dump_json(exclude_none=True).encode()


class CommandModel(BaseModel):
    """Base of every command payload: strict JSON object, optional echo ``id``."""

    # Strict: no true-as-1.0 or "5"-as-5.0 coercions in an operator's command.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: EchoId | None = Field(
        None, description="Any short printable string; echoed in the result to match replies"
    )

    def apply(self, target: CommandTarget, now: float) -> None:
        """Hand the validated command to ``target``; ``now`` is epoch seconds."""
        raise NotImplementedError

    def check_limits(self, limits: CommandLimits, now: float) -> None:
        """Raise :class:`CommandRejected` naming the field when the command exceeds ``limits``."""


class ModeCommand(CommandModel):
    """``cmd/mode``: switch the operating mode."""

    mode: Mode = Field(
        description="auto: optimizer dispatch; manual: operator setpoints; standby: safe idle"
    )

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_mode``."""
        target.set_mode(self.mode)


class ReserveCommand(CommandModel):
    """``cmd/reserve``: the SoC the batteries keep for backup."""

    reserve_soc: float = Field(
        ge=0.0, le=1.0, allow_inf_nan=False, description="Reserve SoC ratio 0..1"
    )

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_reserve``."""
        target.set_reserve(self.reserve_soc)

    def check_limits(self, limits: CommandLimits, now: float) -> None:
        """Refuse a reserve below the configured floor."""
        floor = limits.min_reserve_soc
        if floor is not None and self.reserve_soc < floor:
            raise CommandRejected(f"reserve_soc: below the configured minimum {floor:g}")


class SetpointCommand(CommandModel):
    """``cmd/setpoint``: a manual power setpoint with an expiry (manual mode only)."""

    device: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Device id")
    power_w: float = Field(
        ge=-MAX_COMMAND_POWER_W,
        le=MAX_COMMAND_POWER_W,
        allow_inf_nan=False,
        description="W, > 0 discharges into the site, < 0 charges; clamped by the guard",
    )
    ttl_s: float | None = Field(
        None,
        gt=0.0,
        le=MAX_SETPOINT_S,
        allow_inf_nan=False,
        description="Seconds the setpoint holds (give this or expires_at); then idle",
    )
    expires_at: Timestamp | None = Field(
        None, description="When the setpoint ends (give this or ttl_s); then idle"
    )

    @model_validator(mode="after")
    def _one_expiry(self) -> Self:
        if (self.ttl_s is None) == (self.expires_at is None):
            raise ValueError("ttl_s: give either ttl_s or expires_at")
        return self

    def _expires_at(self, now: float) -> float:
        if self.expires_at is not None:
            expires_at = self.expires_at.timestamp()
            if expires_at <= now:
                raise CommandRejected("expires_at: already in the past")
            if expires_at > now + MAX_SETPOINT_S:
                raise CommandRejected(f"expires_at: more than {MAX_SETPOINT_S:g} s ahead")
            return expires_at
        assert self.ttl_s is not None  # checked by _one_expiry
        return now + self.ttl_s

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_manual_setpoint`` with an absolute expiry."""
        target.set_manual_setpoint(self.device, self.power_w, self._expires_at(now))

    def check_limits(self, limits: CommandLimits, now: float) -> None:
        """Refuse a setpoint held longer, or asking more power, than configured."""
        longest = limits.max_manual_duration_s
        if self._expires_at(now) - now > longest:
            field = "ttl_s" if self.ttl_s is not None else "expires_at"
            raise CommandRejected(f"{field}: longer than the configured maximum {longest:g} s")
        most = limits.max_manual_power_w
        if most is not None and abs(self.power_w) > most:
            raise CommandRejected(f"power_w: beyond the configured maximum {most:g} W")


SeriesValues = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_SERIES_LENGTH)]


NonNegSeriesValues = Annotated[list[NonNegFloat], Field(min_length=1, max_length=MAX_SERIES_LENGTH)]


class _SeriesCommand(CommandModel):
    start: Timestamp = Field(
        description="Start of the first step: ISO 8601 with a UTC offset, or epoch seconds"
    )
    step_s: float = Field(
        ge=60.0, le=86_400.0, allow_inf_nan=False, description="Length of each step, s"
    )

    def _present(self, names: tuple[str, ...]) -> list[tuple[str, list[float]]]:
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]

    def _check_current(self, names: tuple[str, ...], now: float) -> None:
        """Refuse a series that is over before it could be used."""
        steps = len(self._present(names)[0][1])
        if self.start.timestamp() + steps * self.step_s <= now:
            raise CommandRejected("start: the series ends before now")

    def _check_lengths(self, names: tuple[str, ...]) -> None:
        present = self._present(names)
        if not present:
            raise ValueError(f"give at least one of {', '.join(names)}")
        first_name, first = present[0]
        for name, values in present[1:]:
            if len(values) != len(first):
                raise ValueError(
                    f"{name}: has {len(values)} values but {first_name} has {len(first)}"
                )


_PRICE_SERIES = ("import_price", "export_price", "carbon_g_per_kwh")


_FORECAST_SERIES = ("load_w", "pv_w")


class PricesCommand(_SeriesCommand):
    """``cmd/prices``: grid price (and carbon) signals overriding the tariff until they end."""

    import_price: SeriesValues | None = Field(None, description="Import price per kWh, per step")
    export_price: SeriesValues | None = Field(None, description="Export price per kWh, per step")
    carbon_g_per_kwh: NonNegSeriesValues | None = Field(
        None, description="Grid carbon intensity, g/kWh >= 0, per step"
    )

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        self._check_lengths(_PRICE_SERIES)
        return self

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_price_override`` once per series given."""
        self._check_current(_PRICE_SERIES, now)
        # Every series was validated above and the quantity names are the target's own, so a
        # target has nothing left to refuse part-way through (which would apply half of it).
        for name, values in self._present(_PRICE_SERIES):
            target.set_price_override(name, self.start.timestamp(), self.step_s, tuple(values))


class ForecastCommand(_SeriesCommand):
    """``cmd/forecast``: load/PV forecasts overriding the built-in ones until they end."""

    load_w: NonNegSeriesValues | None = Field(None, description="Site load, W >= 0, per step")
    pv_w: NonNegSeriesValues | None = Field(None, description="PV generation, W >= 0, per step")

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        self._check_lengths(_FORECAST_SERIES)
        return self

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_forecast_override`` once per series given."""
        self._check_current(_FORECAST_SERIES, now)
        for name, values in self._present(_FORECAST_SERIES):
            target.set_forecast_override(name, self.start.timestamp(), self.step_s, tuple(values))


#: Longest ahead a session's departure may be announced, s.
MAX_DEPARTURE_AHEAD_S = 7 * 86_400.0


@runtime_checkable
class SessionTarget(Protocol):
    """A daemon with EV chargers (or swap slots): it takes users' session requests.

    Separate from :class:`CommandTarget` so that a site without chargers need not implement
    it; ``cmd/session`` to such a site is refused with ``command: ...``.
    """

    def set_session_request(
        self,
        charger: str,
        departure_s: float | None,
        energy_wh: float | None,
        target_soc: float | None,
        capacity_wh: float | None,
        /,
    ) -> None:
        """Set the request for the session on ``charger`` (an unknown charger: ``charger: ...``)."""
        ...


class SessionCommand(CommandModel):
    """``cmd/session``: what the vehicle on a charger needs and when it leaves.

    Give ``departure`` and/or the energy: ``energy_wh`` (battery energy wanted for the
    session in total) or ``target_soc`` with ``capacity_wh``. What is not given falls back to
    the learned departure and the charger's default energy. The request ends with the session.
    """

    charger: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$",
        description="Charger id (its OCPP identity; id:N for its N-th connector)",
    )
    departure: Timestamp | None = Field(None, description="When the vehicle leaves")
    energy_wh: float | None = Field(
        None, ge=0.0, le=1_000_000.0, allow_inf_nan=False, description="Battery energy wanted, Wh"
    )
    target_soc: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="SoC ratio wanted at departure"
    )
    capacity_wh: float | None = Field(
        None, gt=0.0, le=1_000_000.0, allow_inf_nan=False, description="Vehicle battery, Wh"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.departure is None and self.energy_wh is None and self.target_soc is None:
            raise ValueError("departure: give departure, energy_wh or target_soc")
        if self.energy_wh is not None and self.target_soc is not None:
            raise ValueError("target_soc: give energy_wh or target_soc, not both")
        if (self.target_soc is None) != (self.capacity_wh is None):
            raise ValueError("capacity_wh: target_soc needs capacity_wh (and only it)")
        return self

    def apply(self, target: CommandTarget, now: float) -> None:
        """Call ``set_session_request`` when the target has chargers."""
        departure = None
        if self.departure is not None:
            departure = self.departure.timestamp()
            if departure <= now:
                raise CommandRejected("departure: already in the past")
            if departure > now + MAX_DEPARTURE_AHEAD_S:
                raise CommandRejected(f"departure: more than {MAX_DEPARTURE_AHEAD_S:g} s ahead")
        if not isinstance(target, SessionTarget):
            raise CommandRejected("command: this site has no chargers")
        target.set_session_request(
            self.charger, departure, self.energy_wh, self.target_soc, self.capacity_wh
        )


#: Command name (the last topic level) -> payload model.
COMMANDS: Mapping[str, type[CommandModel]] = {
    "mode": ModeCommand,
    "reserve": ReserveCommand,
    "setpoint": SetpointCommand,
    "prices": PricesCommand,
    "forecast": ForecastCommand,
    "session": SessionCommand,
}
