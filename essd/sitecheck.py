"""Checks of a whole site configuration across sections and files: one path for every command.

:func:`load_settings` validates each field and section on its own; :func:`validate_site` checks
what needs more than one section or another file: each device's profile (found and valid), its
SoC window (device and ``[control]`` together), its capacity (configuration or profile), the
forecast series file (read and parsed as the forecaster will), distinct Modbus endpoints, and
the grid meter. ``essd check-config`` prints its problems and warnings; ``essd run`` (and
:func:`essd.daemon.build_controller`) refuses the same problems, so a file that passes the check
starts, and one that fails it never does.

Meters: at most one device with a meter profile. Two are an error (whose reading would hold the
site limits?). None is allowed, with a warning: without a meter reading the site's import and
export limits cannot be verified, so the daemon idles every battery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from essd.config import DeviceConfig, SerialTransport, Settings

if TYPE_CHECKING:
    from drivers.profile import Profile


@dataclass(frozen=True, slots=True)
class SiteCheck:
    """What :func:`validate_site` found: ``problems`` refuse the site, ``warnings`` do not.

    Each is one line starting with the configuration's source and the dotted field.
    """

    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when nothing refuses the site."""
        return not self.problems


def _endpoint(dev: DeviceConfig) -> tuple[str, str, int, int]:
    t = dev.transport
    if isinstance(t, SerialTransport):
        return ("serial", t.port, 0, t.unit)
    return ("tcp", t.host.lower().rstrip("."), t.port, t.unit)


def _describe(key: tuple[str, str, int, int]) -> str:
    kind, where, port, unit = key
    return f"serial port {where} unit {unit}" if kind == "serial" else f"{where}:{port} unit {unit}"


def validate_site(settings: Settings, source: str = "configuration") -> SiteCheck:
    """Problems and warnings of ``settings`` across sections and files (see the module doc)."""
    # Imported here: drivers and the forecaster are heavier than the configuration.
    from drivers.profile import Capability, ProfileError  # noqa: PLC0415
    from drivers.profile_loader import resolve_profile  # noqa: PLC0415
    from essd.devices import refresh_warning, revert_warning  # noqa: PLC0415
    from essd.domain import DeviceClass  # noqa: PLC0415
    from essd.forecast import ForecastError, SeriesFile  # noqa: PLC0415

    problems: list[str] = []
    warnings: list[str] = []
    profiles: dict[int, Profile] = {}
    for i, dev in enumerate(settings.devices):
        try:
            profiles[i] = resolve_profile(dev.profile, settings.profile_dirs)
        except ProfileError as exc:
            problems.append(f"{source}: devices.{i}.profile: {exc}")

    problems += _endpoint_problems(settings, source)
    meters: list[int] = []
    batteries = 0
    for i, dev in enumerate(settings.devices):
        profile = profiles.get(i)
        if profile is None:
            continue
        if profile.device_class is DeviceClass.METER:
            meters += [i] if dev.enabled else []
            continue
        batteries += int(dev.enabled)
        if not profile.has(Capability.READ_STATE):
            problems.append(
                f"{source}: devices.{i}.profile: {profile.name} reads no SoC and battery power "
                "(no read_state capability, e.g. a PCS whose BMS is a separate device): essd "
                "cannot dispatch it"
            )
            continue
        problems += _storage_problems(
            settings, i, profile.ratings.capacity_wh, profile.name, source
        )
        if dev.enabled:
            revert = revert_warning(dev, profile)
            if revert is not None and profile.behaviour.unknown:
                revert += f"; the public map leaves unknown: {profile.behaviour.unknown}"
            found = (refresh_warning(dev, profile, settings.control.cycle_period_s), revert)
            warnings += [f"{source}: devices.{i}: {w}" for w in found if w is not None]
    problems += [
        f"{source}: devices.{j}.profile: a second grid meter (devices.{meters[0]}, "
        f"{settings.devices[meters[0]].id}, is one): essd reads exactly one"
        for j in meters[1:]
    ]
    if batteries and not meters and not problems:
        warnings.append(
            f"{source}: devices: no grid meter (no enabled device with a meter profile): the "
            "site's import and export limits cannot be verified, so every battery idles"
        )

    charger_problems, charger_warnings = _charger_checks(settings, source, has_meter=bool(meters))
    problems += charger_problems
    warnings += charger_warnings
    if settings.swap_station is not None:
        swap_problems, swap_warnings = _swap_checks(settings, profiles, source, bool(meters))
        problems += swap_problems
        warnings += swap_warnings

    series: Path | None = settings.forecast.series_file
    if series is not None:
        try:
            SeriesFile(series, ZoneInfo(settings.site.timezone))
        except ForecastError as exc:
            problems.append(f"{source}: forecast.series_file: {exc}")
    return SiteCheck(tuple(problems), tuple(warnings))


def _charger_checks(
    settings: Settings, source: str, *, has_meter: bool
) -> tuple[list[str], list[str]]:
    """EV chargers: duplicate ids refused; chargers without OCPP, OCPP without a meter warned."""
    ids = [c.id for c in settings.chargers]
    problems = [
        f"{source}: chargers.{i}.id: duplicate charger id {cid!r}"
        for i, cid in enumerate(ids)
        if cid in ids[:i]
    ]
    warnings = []
    if settings.chargers and settings.ocpp is None:
        warnings.append(f"{source}: chargers: no [ocpp] section: the chargers are not controlled")
    if settings.ocpp is not None and not has_meter:
        warnings.append(
            f"{source}: ocpp: no grid meter: the chargers stay paused (the import limit cannot"
            " be verified)"
        )
    return problems, warnings


def _swap_checks(
    settings: Settings, profiles: Mapping[int, Profile], source: str, has_meter: bool
) -> tuple[list[str], list[str]]:
    """The swap station: each slot a storage device essd can charge whose SoC window reaches
    the target; the demand series readable; without a meter the slots stay paused."""
    from drivers.profile import Capability  # noqa: PLC0415
    from essd.swapsite import read_swap_series  # noqa: PLC0415

    cfg = settings.swap_station
    assert cfg is not None
    index = {d.id: i for i, d in enumerate(settings.devices)}
    problems: list[str] = []
    warnings: list[str] = []
    for n, sid in enumerate(cfg.slots):
        i = index[sid]  # Settings checked that every slot is a device
        profile = profiles.get(i)
        if profile is None:
            continue
        if not (profile.has(Capability.CHARGE_LIMIT) or profile.has(Capability.ACTIVE_POWER)):
            problems.append(
                f"{source}: swap_station.slots.{n}: {sid!r} (profile {profile.name}) takes no "
                "charge limit or power setpoint: essd cannot charge its pack"
            )
            continue
        dev = settings.devices[i]
        top = min(settings.control.max_soc, 1.0 if dev.max_soc is None else dev.max_soc)
        if cfg.target_soc > top:
            problems.append(
                f"{source}: swap_station.target_soc: {cfg.target_soc:g} is above the max SoC "
                f"{top:g} of slot {sid!r} (control.max_soc, devices.{i}.max_soc)"
            )
    if cfg.demand_series_file is not None:
        try:
            read_swap_series(cfg.demand_series_file, ZoneInfo(settings.site.timezone))
        except ValueError as exc:
            problems.append(f"{source}: swap_station.demand_series_file: {exc}")
    if not has_meter:
        warnings.append(
            f"{source}: swap_station: no grid meter: the slots stay paused (the import limit "
            "cannot be verified)"
        )
    return problems, warnings


def _endpoint_problems(settings: Settings, source: str) -> list[str]:
    """Two devices on one Modbus unit (host:port:unit, or serial port and unit)."""
    seen: dict[tuple[str, str, int, int], int] = {}
    out = []
    for i, dev in enumerate(settings.devices):
        key = _endpoint(dev)
        j = seen.setdefault(key, i)
        if j != i:
            out.append(
                f"{source}: devices.{i}.transport: {_describe(key)} is already devices.{j} "
                f"({settings.devices[j].id}): one unit, one device"
            )
    return out


def _storage_problems(
    settings: Settings, i: int, rated_capacity_wh: float, profile_name: str, source: str
) -> list[str]:
    """A storage device's capacity (config or profile) and SoC window (device and control)."""
    dev, ctl = settings.devices[i], settings.control
    where = f"{source}: devices.{i}"
    out = []
    if not (dev.capacity_wh or rated_capacity_wh) > 0:
        out.append(
            f"{where}.capacity_wh: profile {profile_name} rates no capacity "
            "(ratings.capacity_wh is 0): give the capacity here"
        )
    reserve = max(ctl.reserve_soc, dev.reserve_soc or 0.0)
    top = min(ctl.max_soc, 1.0 if dev.max_soc is None else dev.max_soc)
    if reserve >= top:
        field = "reserve_soc" if dev.reserve_soc is not None else "max_soc"
        out.append(
            f"{where}.{field}: empty SoC window: reserve {reserve:g} (the larger of "
            f"devices.{i}.reserve_soc and control.reserve_soc) is not below max {top:g} "
            f"(the smaller of devices.{i}.max_soc and control.max_soc)"
        )
    return out
