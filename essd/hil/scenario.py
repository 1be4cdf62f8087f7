"""HIL scenario files: a site, its true time series, a fault timeline and expectations.

A scenario is a YAML file (``profiles/scenarios/*.yaml``) validated by a strict pydantic schema
(unknown keys are errors). Every problem is reported as one line
``<file>: <dotted.field>: <message>``, so an engineer can fix a scenario without reading code.

Units: W, Wh, SoC ratios 0..1, prices per kWh in the tariff's currency, carbon in g/kWh,
durations in seconds or as ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``. Battery W > 0 discharges
into the site; grid W > 0 imports.

The site is either a TOML configuration (``site.config``, the file ``essd run`` takes) or the
same content inline (``site.settings``); ``site.overrides`` merges section by section on top.
Device transports may be left out: the runner serves every device on a free loopback port.
"""

from __future__ import annotations

import json
import re
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.profile import ProfileError
from drivers.profile_loader import resolve_profile
from essd.config import MqttConfig, Settings
from essd.series import SERIES_COLUMNS, SeriesError, read_series_csv
from hil_sim.faults import FaultError, FaultSpec, Seconds, check_devices


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSpec(_Strict):
    """The site under test: a TOML configuration file, inline settings, or both merged."""

    config: Path | None = Field(None, description="essd TOML file, relative to the scenario")
    settings: dict[str, Any] | None = Field(None, description="the TOML content, inline")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged section by section over config/settings"
    )
    initial_soc: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict, description="true SoC per device at the start (ratio)"
    )
    grid_import_limit_w: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="the contractual import limit the run is checked against (W); default: the "
        "configured one (an integrator may configure essd with a margin below it)",
    )
    grid_export_limit_w: Annotated[float, Field(ge=0)] | None = Field(
        None, description="the contractual export limit checked (W); default: the configured one"
    )
    export_limiter: bool = Field(
        False,
        description="the PV inverters curtail PV themselves so export stays within the limit "
        "(anti-backflow devices of zero-export sites)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.config is None) == (self.settings is None):
            raise ValueError("config: give either site.config or site.settings (exactly one)")
        return self


class InlineSeries(_Strict):
    """Time series written in the scenario: one value per ``step_s`` from the start."""

    step_s: Seconds = Field(gt=0)
    load_w: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...] = ()
    pv_w: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...] = ()
    import_price: tuple[Annotated[float, Field(allow_inf_nan=False)], ...] = ()
    export_price: tuple[Annotated[float, Field(allow_inf_nan=False)], ...] = ()
    carbon_g_per_kwh: tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...] = ()

    @model_validator(mode="after")
    def _lengths(self) -> Self:
        given = {c: len(getattr(self, c)) for c in SERIES_COLUMNS if getattr(self, c)}
        if "load_w" not in given:
            raise ValueError("load_w: required")
        n = given["load_w"]
        for col, k in given.items():
            if k != n:
                raise ValueError(f"{col}: has {k} values, load_w has {n}")
        return self


class SeriesSpec(_Strict):
    """The true site series (what really happens): a CSV file or inline values.

    The CSV is the forecaster's format: ``time`` (ISO 8601 or epoch s) and any of
    ``load_w, pv_w, import_price, export_price, carbon_g_per_kwh``. Missing prices come from the
    site's tariff; missing PV is 0; missing carbon intensity the forecast default.
    """

    file: Path | None = None
    inline: InlineSeries | None = None
    forecast: Literal["perfect", "learned"] = Field(
        "perfect",
        description="perfect: the daemon forecasts from the true series; learned: it learns "
        "net load from the meter (prices still from the series)",
    )
    hold: bool = Field(
        False,
        description="values are step averages: load and PV held over the step, not interpolated",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.file is None) == (self.inline is None):
            raise ValueError("file: give either series.file or series.inline (exactly one)")
        return self


class Expectations(_Strict):
    """What the run must show; every one that fails is named in the exit message."""

    max_violations: Annotated[int, Field(ge=0)] = 0
    site_limit_tolerance_w: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="how far (W) the grid may pass a site limit before it counts as a violation "
        "(anti-backflow relays trip above a threshold, not at 0 W)",
    )
    worst_rung: Annotated[int, Field(ge=1, le=5)] = 5
    max_cost_ratio: Annotated[float, Field(gt=0)] | None = Field(
        None, description="cost at most this fraction of the no-battery baseline"
    )
    min_savings: float | None = Field(None, description="baseline - cost at least this")
    min_savings_vs_optimum: Annotated[float, Field(le=1.0)] | None = Field(
        None, description="savings at least this fraction of the perfect-foresight savings"
    )
    max_peak_import_w: Annotated[float, Field(ge=0)] | None = None
    max_export_wh: Annotated[float, Field(ge=0)] | None = None
    min_self_consumption: Annotated[float, Field(ge=0, le=1)] | None = None
    max_unsafe_writes: Annotated[int, Field(ge=0)] = 0
    min_rung_during_faults: Annotated[int, Field(ge=1, le=5)] | None = Field(
        None, description="each fault must drive at least one cycle to this rung or worse"
    )


SIGNALS = ("SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGINT")
SignalName = Literal["SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGINT"]


class EventSpec(BaseModel):
    """One runner-level event at offset ``at`` (essd.hil.hostile says what each kind does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["wall_clock_step", "signal", "command"]
    at: Seconds
    step_s: Annotated[float, Field(allow_inf_nan=False, ge=-366 * 86_400.0, le=366 * 86_400.0)] = (
        Field(0.0, description="wall_clock_step: how far the wall clock jumps, s (either sign)")
    )
    signal: SignalName | None = Field(None, description="signal: the signal essd receives")
    restart_after: Seconds | None = Field(
        None, description="signal: simulated time until essd runs again (default 2m)"
    )
    topic: Annotated[str, Field(pattern=r"^(cmd/)?[a-z_]{1,32}$")] | None = Field(
        None, description="command: the command name (mode, reserve, setpoint...), cmd/ optional"
    )
    payload: dict[str, Any] | str | None = Field(
        None, description="command: the JSON payload (an object, or raw text sent as is)"
    )
    retain: bool = Field(False, description="command: published retained")
    burst: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="command: this many copies at once, then a standby"
    )
    window: Seconds | None = Field(
        None,
        description="how long its cycles are reported (default 2 cycles; a signal adds "
        "restart_after)",
    )

    @model_validator(mode="after")
    def _params(self) -> Self:
        given = self.model_fields_set
        own = {
            "wall_clock_step": {"step_s"},
            "signal": {"signal", "restart_after"},
            "command": {"topic", "payload", "retain", "burst"},
        }
        for name in sorted(set().union(*own.values()) - own[self.kind]):
            if name in given:
                raise ValueError(
                    f"{name}: only for kind {sorted(k for k, v in own.items() if name in v)[0]}"
                )
        if self.kind == "wall_clock_step" and self.step_s == 0.0:
            raise ValueError("step_s: required (non-zero) for kind wall_clock_step")
        if self.kind == "signal" and self.signal is None:
            raise ValueError("signal: required for kind signal")
        if self.kind == "command":
            if self.topic is None:
                raise ValueError("topic: required for kind command")
            if self.payload is None:
                raise ValueError("payload: required for kind command")
        return self

    @property
    def name(self) -> str:
        """The command name without ``cmd/``."""
        return (self.topic or "").removeprefix("cmd/")

    @property
    def downtime_s(self) -> float:
        """How long essd is down after a signal (0 for other kinds)."""
        if self.kind != "signal":
            return 0.0
        return 120.0 if self.restart_after is None else self.restart_after

    def payload_bytes(self) -> bytes:
        """The payload as sent on the wire."""
        if isinstance(self.payload, str):
            return self.payload.encode()
        return json.dumps(self.payload).encode()

    def what(self) -> str:
        """A short description for labels and the report."""
        if self.kind == "wall_clock_step":
            return f"{self.step_s:+g}s"
        if self.kind == "signal":
            return str(self.signal)
        return self.name


class Scenario(_Strict):
    """One HIL scenario (see the module docstring)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    description: str = ""
    site: SiteSpec
    start: datetime = Field(description="ISO 8601 with offset (local time of the site)")
    duration: Seconds = Field(gt=0)
    speed: Annotated[float, Field(gt=0)] | None = Field(
        None, description="None: stepped clock (as fast as it computes); else sim s per real s"
    )
    cycle_period: Seconds = Field(ge=1.0, le=300.0, description="the daemon's cycle period")
    series: SeriesSpec
    faults: tuple[FaultSpec, ...] = ()
    events: tuple[EventSpec, ...] = Field(
        (), description="runner-level events: wall_clock_step, signal, command (essd.hil.hostile)"
    )
    expect: Expectations = Expectations()

    # Filled by the loader: where relative paths resolve, and the validated site.
    source: Path = Field(Path("<inline>"), exclude=True)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.start.tzinfo is None:
            raise ValueError("start: needs a UTC offset, e.g. 2026-07-01T00:00:00+08:00")
        if self.duration < self.cycle_period:
            raise ValueError("duration: shorter than one cycle_period")
        for i, f in enumerate(self.faults):
            if f.end > self.duration:
                raise ValueError(f"faults.{i}.duration: the fault outlasts the scenario")
        for i, e in enumerate(self.events):
            if e.at + e.downtime_s >= self.duration:
                field = "restart_after" if e.kind == "signal" else "at"
                raise ValueError(f"events.{i}.{field}: essd would not run again before the end")
        return self

    @property
    def start_epoch(self) -> float:
        """The start as epoch seconds."""
        return self.start.timestamp()

    @property
    def cycles(self) -> int:
        """How many control cycles the scenario runs."""
        return int(self.duration // self.cycle_period)

    def resolve(self, path: Path) -> Path:
        """``path`` relative to the scenario file's folder."""
        return path if path.is_absolute() else self.source.parent / path


class ScenarioError(Exception):
    """A scenario is invalid: ``problems`` holds one ``file: field: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _loc(loc: tuple[int | str, ...]) -> str:
    # Drop pydantic's tags for tagged unions and function validators.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("fn")))]
    return ".".join(parts) or "(top level)"


def _format(exc: ValidationError, source: str, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        msg = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        dotted = _loc(err["loc"])
        # A model validator names its field at the start of the message: move it to the path.
        m = re.match(r"^([a-z_][a-z0-9_.]*): (.*)$", msg)
        if m and err["type"] == "value_error":
            head = m.group(1)
            dotted = head if dotted == "(top level)" else f"{dotted}.{head}"
            msg = m.group(2)
        lines.append(f"{source}: {prefix}{dotted}: {msg}")
    return lines


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_PLACEHOLDER = {"kind": "tcp", "host": "127.0.0.1", "port": 502, "unit": 1}


def _site_data(scenario: Scenario) -> tuple[dict[str, Any], str]:
    """The site's TOML content merged with its overrides, and the field prefix for errors."""
    spec = scenario.site
    src = str(scenario.source)
    if spec.config is not None:
        path = scenario.resolve(spec.config)
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ScenarioError(
                [f"{src}: site.config: cannot read {path}: {exc.strerror}"]
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError([f"{path}: not valid TOML: {exc}"]) from None
        prefix = "site.config."
    else:
        data = dict(spec.settings or {})
        prefix = "site.settings."
    return _merge(data, spec.overrides), prefix


def site_mqtt(scenario: Scenario) -> MqttConfig | None:
    """The site's ``[mqtt]`` section (the run publishes nowhere, but operator commands of
    ``events`` get its limits); None when the site has none."""
    data, prefix = _site_data(scenario)
    raw = data.get("mqtt")
    if raw is None:
        return None
    try:
        return MqttConfig.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(_format(exc, str(scenario.source), prefix + "mqtt.")) from None


def site_settings(scenario: Scenario) -> Settings:
    """The site's validated :class:`Settings` (ScenarioError naming file and field)."""
    spec = scenario.site
    src = str(scenario.source)
    data, prefix = _site_data(scenario)
    devices = []
    for i, dev in enumerate(data.get("devices", [])):
        # A device without a transport gets its own placeholder endpoint: the simulator serves
        # it on a free loopback port and rewrites the address.
        placed = (
            {**dev, "transport": {**_PLACEHOLDER, "port": 20_000 + i}}
            if isinstance(dev, dict)
            else dev
        )
        devices.append(dev if isinstance(dev, dict) and "transport" in dev else placed)
    data["devices"] = devices
    # The scenario's cycle period is the daemon's; a setpoint must outlive two cycles.
    control = dict(data.get("control", {}))
    control["cycle_period_s"] = scenario.cycle_period
    control["setpoint_ttl_s"] = max(
        float(control.get("setpoint_ttl_s", 60.0)), 2 * scenario.cycle_period
    )
    data["control"] = control
    # Profile folders named in the scenario are relative to the scenario file.
    data["profile_dirs"] = [str(scenario.resolve(Path(d))) for d in data.get("profile_dirs", [])]
    # The HIL run publishes nowhere: no metrics port, no broker.
    data.pop("mqtt", None)
    data["metrics"] = {**data.get("metrics", {}), "enabled": False}
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ScenarioError(_format(exc, src, prefix)) from None
    ids = {d.id for d in settings.devices}
    problems = [
        f"{src}: site.initial_soc.{dev}: no such device"
        for dev in spec.initial_soc
        if dev not in ids
    ]
    classes = {}
    for d in settings.devices:
        try:
            classes[d.id] = resolve_profile(d.profile, settings.profile_dirs).device_class.value
        except ProfileError as exc:
            problems.append(f"{src}: {prefix}devices: {d.id}: {exc}")
    try:
        check_devices(scenario.faults, classes, src)
    except FaultError as exc:
        problems += str(exc).splitlines()
    if problems:
        raise ScenarioError(problems)
    return settings


def _check_series_file(scenario: Scenario, tz: ZoneInfo) -> list[str]:
    """The series file read now as the run will read it (:func:`essd.series.read_series_csv`)."""
    if scenario.series.file is None:
        return []
    path = scenario.resolve(scenario.series.file)
    try:
        _, columns = read_series_csv(path, tz)
    except SeriesError as exc:
        return [f"{scenario.source}: series.file: {exc}"]
    if "load_w" not in columns:
        return [f"{scenario.source}: series.file: {path.name} has no 'load_w' column"]
    return []


def load_scenario(path: Path) -> tuple[Scenario, Settings]:
    """Load and validate a scenario file and its site; ScenarioError on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError([f"{path}: not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ScenarioError([f"{path}: (top level): must be a mapping"])
    try:
        scenario = Scenario(**raw, source=path)
    except ValidationError as exc:
        raise ScenarioError(_format(exc, str(path))) from None
    settings = site_settings(scenario)
    if scenario.events:
        site_mqtt(scenario)  # the command limits come from it: refuse a bad one now
    try:
        tz = ZoneInfo(settings.site.timezone)
    except Exception:  # validated by Settings already; keep the error readable anyway
        raise ScenarioError([f"{path}: site.timezone: unknown"]) from None
    problems = _check_series_file(scenario, tz)
    if problems:
        raise ScenarioError(problems)
    return scenario, settings
