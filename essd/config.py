"""Typed configuration: a TOML file plus ``ESSD_...`` environment variables.

Environment variables use ``__`` for nesting (``ESSD_CONTROL__CYCLE_PERIOD_S=5``) and win over
the file. Unknown keys are errors everywhere (``extra="forbid"``); a configured file that does
not exist is an error too (pydantic-settings would silently ignore it). Every problem is
reported as one line naming the dotted field path and where it came from.

Every number must be finite: ``inf`` and ``nan`` (which TOML and the environment both accept)
are refused everywhere; a limit that may be absent is optional (``None``), never infinite. The
file must be UTF-8 text of at most :data:`MAX_CONFIG_BYTES`; anything else is refused before it
is parsed. Checks across sections and files (profiles, series file, endpoints, meters) live in
:mod:`essd.sitecheck`, which ``check-config`` and ``run`` both use.

Units: power in W (site limits are magnitudes >= 0), energy in Wh, SoC as a ratio 0..1, prices
in the tariff's currency per kWh (per kW for the demand charge), carbon in g/kWh and per kg.

Loading (:func:`~essd.config_loading.load_settings`, :class:`~essd.config_loading.ConfigError`)
is :mod:`essd.config_loading`.
"""

from __future__ import annotations

import ipaddress
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from essd import DEFAULT_CONFIG_PATH as _DEFAULT_CONFIG_PATH
from essd.config_ev import ChargerConfig, OcppConfig, SwapStationConfig
from essd.config_forecast import (
    NORDPOOL_CURRENCIES,
    ForecastConfig,
    OnlineForecastConfig,
    OnlinePricesConfig,
    OnlinePvConfig,
    OnlineSourceConfig,
    PvArrayConfig,
    TariffConfig,
    TouWindow,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "ControlConfig",
    "CredibilityConfig",
    "DeviceConfig",
    "ForecastConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MqttConfig",
    "OnlineForecastConfig",
    "OnlinePricesConfig",
    "OnlinePvConfig",
    "OnlineSourceConfig",
    "PvArrayConfig",
    "Settings",
    "SiteConfig",
    "StateConfig",
    "TariffConfig",
    "TouWindow",
    "config_data",
]


DEFAULT_CONFIG_PATH = _DEFAULT_CONFIG_PATH  # defined where the CLI reads it without pydantic


ENV_PREFIX = "ESSD_"


# A site with hundreds of devices fits in a few tens of KiB; anything larger is not a config.
MAX_CONFIG_BYTES = 256 * 1024


DeviceId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


Port = Annotated[int, Field(ge=1, le=65535)]


UnitId = Annotated[int, Field(ge=0, le=247)]


Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


NonNegW = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class _Section(BaseModel):
    # allow_inf_nan=False: every float in the configuration is finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SiteConfig(_Section):
    """The site: one essd per grid connection."""

    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    name: str = ""
    timezone: str = Field(
        description="IANA time zone of the site, e.g. Europe/Berlin (required: it names the "
        "hour of every tariff window, the day of the daily totals and the billing period)"
    )
    grid_import_limit_w: NonNegW = Field(description="Import limit at the connection, W >= 0")
    grid_export_limit_w: NonNegW = Field(
        description="Export limit at the connection, W >= 0 (0 = zero export)"
    )
    pv_curtailable: bool = Field(False, description="PV inverters curtail to hold the limit")
    limit_margin_w: NonNegW | None = Field(
        None,
        description="Kept inside both limits for meter error and load steps, W "
        "(default 3 % of the larger limit)",
    )
    connection_max_w: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = Field(
        None,
        description="A meter reading beyond +- this is implausible, W (default twice the "
        "largest of the limits and the batteries' total rating)",
    )
    max_load_step_w: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = Field(
        None,
        description="A larger net-load change between readings needs a second reading to be "
        "believed, W (default a quarter of the largest of the limits and the batteries' total "
        "rating)",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class TcpTransport(_Section):
    """Modbus TCP to a device or gateway."""

    kind: Literal["tcp"]
    host: str = Field(min_length=1)
    port: Port = 502
    unit: UnitId = 1


class RtuOverTcpTransport(_Section):
    """Modbus RTU framing over TCP, for serial-to-Ethernet gateways."""

    kind: Literal["rtu-over-tcp"]
    host: str = Field(min_length=1)
    port: Port = 502
    unit: UnitId = 1


class SerialTransport(_Section):
    """Modbus RTU on a serial line."""

    kind: Literal["serial"]
    port: str = Field(min_length=1, description="Device path, e.g. /dev/ttyUSB0")
    baudrate: Annotated[int, Field(gt=0)] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit: UnitId = 1


Transport = Annotated[
    TcpTransport | RtuOverTcpTransport | SerialTransport, Field(discriminator="kind")
]


class DeviceConfig(_Section):
    """One device on the site. Configured limits can only tighten the profile's and the BMS's."""

    id: DeviceId
    profile: str = Field(min_length=1)
    transport: Transport
    poll_timeout_s: Annotated[float, Field(gt=0.0, le=10.0)] = 0.5
    enabled: bool = True
    max_charge_w: NonNegW | None = None
    max_discharge_w: NonNegW | None = None
    capacity_wh: Annotated[float, Field(gt=0.0)] | None = None
    reserve_soc: Ratio | None = None
    max_soc: Ratio | None = None
    degradation_cost_per_kwh: Annotated[float, Field(ge=0.0)] | None = None
    terminal_soc: Ratio | None = Field(None, description="Soft SoC target at the horizon's end")


class ControlConfig(_Section):
    """The control cycle and the dispatch optimization."""

    cycle_period_s: Annotated[float, Field(ge=1.0, le=900.0)] = 10.0
    step_s: Annotated[float, Field(ge=60.0, le=3600.0)] = 900.0
    horizon_steps: Annotated[int, Field(ge=2, le=1000)] = 96
    solver: Literal["HIGHS", "CLARABEL"] = "HIGHS"  # HiGHS measured 2-5x faster here
    solve_budget_s: Annotated[float, Field(gt=0.0, le=60.0)] = 2.0
    reserve_soc: Ratio = 0.10
    max_soc: Ratio = 0.95
    setpoint_ttl_s: Annotated[float, Field(ge=2.0, le=3600.0)] = 60.0
    ramp_w_per_s: Annotated[float, Field(gt=0.0)] | None = None
    stale_after_s: Annotated[float, Field(gt=0.0)] | None = None
    degradation_cost_per_kwh: Annotated[float, Field(ge=0.0)] = 0.02
    churn_penalty_per_kw: Annotated[float, Field(ge=0.0)] = 0.001
    # Plan the first step's demand charge on the billing window under way (what the meter
    # imported in it so far; essd.dispatch.inputs.first_step_peak_kw). Off by default: on the
    # example commercial history and three more of its generator at 5-minute cycles it
    # captured 0.68 of the optimum's savings on average against 0.76 without (docs/backtest.md).
    plan_billing_window: bool = False
    # Units of the same specification planned as one battery and the plan shared among them
    # (essd.dispatch.aggregate): exact while their live data are equal; a little plan value
    # is lost when a unit's own limit binds before its group's (bench: aggregate_loss_ratio).
    aggregate_identical_units: bool = True
    # An LP of more batteries than this (after identical units are grouped) is planned as about
    # this many groups of similar units (an approximation for large sites of different units;
    # essd.dispatch.aggregate). "auto": as many groups as keep the LP within 3,000
    # battery-steps (none for sites that fit, e.g. 31 units at 96 steps); null: never.
    aggregate_clusters: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.reserve_soc >= self.max_soc:
            raise ValueError("reserve_soc: must be below max_soc")
        if self.setpoint_ttl_s < 2 * self.cycle_period_s:
            raise ValueError("setpoint_ttl_s: must be at least twice cycle_period_s")
        return self


class CredibilityConfig(_Section):
    """When readings are believed (essd.credibility): dwell, settling and tolerances."""

    dwell_s: Annotated[float, Field(ge=0.0)] = 300.0
    max_dwell_s: Annotated[float, Field(ge=0.0)] = 3600.0
    settle_s: Annotated[float, Field(ge=0.0)] = 30.0
    power_tolerance_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    frozen_soc_steps: Annotated[float, Field(ge=1.0)] = 2.0
    soc_tolerance: Ratio = 0.01
    heartbeat_stall_s: Annotated[float, Field(gt=0.0)] = 30.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_dwell_s < self.dwell_s:
            raise ValueError("max_dwell_s: must be at least dwell_s")
        return self


class MqttConfig(_Section):
    """MQTT publishing and commands (the section is optional)."""

    host: str = Field(min_length=1)
    port: Port = 1883
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = Field(None, description="TLS client certificate (PEM)")
    key_file: Path | None = Field(None, description="Private key of cert_file (PEM)")
    client_id: str | None = Field(
        None, description="Default essd-<site id>-<random hex>, unique per process"
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version; 5 tells a retained command from a live one"
    )
    allow_anonymous_control: bool = Field(
        False, description="Accept commands over a connection without credentials"
    )
    max_manual_duration_s: Annotated[float, Field(gt=0.0, le=86_400.0)] = 3600.0
    max_manual_power_w: NonNegW | None = Field(
        None, description="Largest manual setpoint magnitude, W (default: the device limit)"
    )
    min_reserve_soc: Ratio | None = Field(
        None, description="Lowest reserve a command may set (default: control.reserve_soc)"
    )
    command_queue_size: Annotated[int, Field(ge=1, le=100_000)] = 100
    base_topic: str = "essd"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    ha_discovery: bool = True
    ha_prefix: str = "homeassistant"
    ha_setpoint_ttl_s: Annotated[float, Field(gt=0.0, le=86_400.0)] = Field(
        3600.0,
        description="How long a manual setpoint chosen in Home Assistant holds, s "
        "(at most max_manual_duration_s)",
    )
    reconnect_min_s: Annotated[float, Field(gt=0.0, le=60.0)] = 1.0
    reconnect_max_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 60.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.ha_setpoint_ttl_s > self.max_manual_duration_s:
            raise ValueError("ha_setpoint_ttl_s: must be at most max_manual_duration_s")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s: must be at least reconnect_min_s")
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None and not self.tls:
                raise ValueError(f"{name}: only used with tls = true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("key_file: give both cert_file and key_file, or neither")
        for name in ("base_topic", "ha_prefix"):
            topic = getattr(self, name)
            if not topic.strip("/") or any(c in topic for c in "+#\x00"):
                raise ValueError(f"{name}: must be a non-empty topic without wildcards + or #")
        return self

    @property
    def authenticated(self) -> bool:
        """True when essd presents credentials: username and password, or a client certificate."""
        has_password = self.username is not None and self.password is not None
        return has_password or self.cert_file is not None

    @property
    def commands_enabled(self) -> bool:
        """Commands are applied only over an authenticated connection, or by explicit opt-in."""
        return self.authenticated or self.allow_anonymous_control

    def security_warnings(self) -> list[str]:
        """Risky but valid settings, one line each (logged at start, printed by check-config)."""
        out = []
        if not self.commands_enabled:
            out.append(
                "mqtt: commands disabled: anonymous connection (set username and password or "
                "a TLS client certificate, or allow_anonymous_control = true)"
            )
        elif not self.authenticated:
            out.append(
                "mqtt: allow_anonymous_control = true: anyone who can publish on the broker "
                "can control the batteries"
            )
        if not self.tls and (self.username is not None or self.password is not None):
            out.append("mqtt: tls = false: the password crosses the network in plaintext")
        if self.commands_enabled and self.protocol == "3.1.1":
            out.append(
                "mqtt: protocol 3.1.1 cannot tell a retained command published while essd is "
                "connected from a live one; use protocol 5"
            )
        return out


class MetricsConfig(_Section):
    """The Prometheus endpoint (loopback by default: expose it deliberately)."""

    enabled: bool = True
    bind: str = Field("127.0.0.1", description="IP address or host name to listen on")
    port: Port = 9108
    #: Open connections at most; the next ones are closed at once until one ends.
    max_connections: int = Field(default=64, ge=1, le=10_000)
    #: Seconds a client has to send a whole request head after connecting.
    header_timeout_s: float = Field(default=5.0, gt=0, le=300)
    #: Seconds a kept-alive connection may wait for its next request, and a response may
    #: wait to be taken up by the client, before the connection is closed.
    idle_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Bytes a request head may take (request line and headers).
    max_request_bytes: int = Field(default=8192, ge=1024, le=1_048_576)
    #: Scrapes answered per second at most; more wait in line (0: no limit).
    max_scrapes_per_s: float = Field(default=50.0, ge=0, le=10_000)

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            if not _HOSTNAME.fullmatch(v):
                raise ValueError(f"{v!r} is neither an IP address nor a host name") from None
        return v


# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class StateConfig(_Section):
    """Durable state (billing peak, totals, learned forecasts, last plan, mode and reserve)."""

    enabled: bool = True
    directory: Path | None = Field(
        None,
        description="Where state.json lives; default: $STATE_DIRECTORY (systemd StateDirectory=),"
        " else state is kept in memory only",
    )
    save_interval_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 60.0


class LoggingConfig(_Section):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


config_data: ContextVar[dict[str, Any] | None] = ContextVar("essd_config_data", default=None)


class Settings(BaseSettings):
    """The whole configuration of one essd instance."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        allow_inf_nan=False,
    )

    site: SiteConfig
    devices: tuple[DeviceConfig, ...] = ()
    control: ControlConfig = ControlConfig()
    credibility: CredibilityConfig = CredibilityConfig()
    tariff: TariffConfig
    forecast: ForecastConfig = ForecastConfig()
    mqtt: MqttConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()
    profile_dirs: tuple[Path, ...] = ()
    ocpp: OcppConfig | None = None
    chargers: tuple[ChargerConfig, ...] = ()
    swap_station: SwapStationConfig | None = None

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [d.id for d in self.devices]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"devices: duplicate id(s) {', '.join(dup)}")
        if self.swap_station is not None and self.ocpp is not None:
            raise ValueError("swap_station: a site has either [ocpp] chargers or a swap station")
        for i, slot in enumerate(self.swap_station.slots if self.swap_station else ()):
            if slot not in ids:
                raise ValueError(f"swap_station.slots.{i}: no device with id {slot!r}")
        prices = self.forecast.online.prices
        if prices.enabled and self.tariff.currency not in NORDPOOL_CURRENCIES:
            raise ValueError(
                f"forecast.online.prices: Nord Pool quotes no prices in the tariff's currency "
                f"{self.tariff.currency} ({', '.join(NORDPOOL_CURRENCIES)})"
            )
        if self.control.plan_billing_window and self.demand_window_s != self.control.step_s:
            raise ValueError(
                "control.plan_billing_window: plans the window under way as the plan's first"
                " step, so tariff.demand_window_s must equal control.step_s"
            )
        return self

    @property
    def demand_window_s(self) -> float:
        """The billing window of the demand charge (s): ``tariff.demand_window_s``, else the
        plan step."""
        window = self.tariff.demand_window_s
        return self.control.step_s if window is None else window

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then the environment, then the TOML file (earlier wins).

        The file was read and parsed once by :func:`load_settings`; its data is used as is.
        """
        data = config_data.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)
