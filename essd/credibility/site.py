"""The credibility thresholds of a configured site: defaults derived from its limits and units."""

from __future__ import annotations

from collections.abc import Iterable

from drivers.profile import Profile
from essd.config import Settings
from essd.credibility.types import CredibilitySettings
from essd.safety import DeviceEnvelope


def rating(env: DeviceEnvelope) -> float:
    """The larger of a unit's charge and discharge ratings (W)."""
    return max(env.max_charge_w, env.max_discharge_w)


def default_connection_max_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """Twice the largest of the two limits and the batteries' total rating (W).

    The grid can exceed a limit by what the batteries stop covering; twice the largest of
    these is beyond anything the site can draw or feed and well inside a glitch.
    """
    total = sum(rating(e) for e in envelopes)
    return 2.0 * max(import_limit_w, export_limit_w, total)


def default_max_load_step_w(
    import_limit_w: float, export_limit_w: float, envelopes: Iterable[DeviceEnvelope]
) -> float:
    """A quarter of the largest of the two limits and the batteries' total rating (W)."""
    total = sum(rating(e) for e in envelopes)
    return 0.25 * max(import_limit_w, export_limit_w, total)


def default_limit_margin_w(import_limit_w: float, export_limit_w: float) -> float:
    """3 % of the larger limit (W): a class-1 meter's error at the limit plus a small load step
    within one cycle, capped so the window between the limits never closes."""
    margin = 0.03 * max(import_limit_w, export_limit_w)
    return min(margin, (import_limit_w + export_limit_w) / 4.0)


def settings_for_site(
    settings: Settings, envelopes: Iterable[DeviceEnvelope]
) -> CredibilitySettings:
    """The credibility thresholds of a configured site, defaults filled in."""
    envs = list(envelopes)
    site, cred = settings.site, settings.credibility
    imp, exp = site.grid_import_limit_w, site.grid_export_limit_w
    return CredibilitySettings(
        connection_max_w=(
            site.connection_max_w
            if site.connection_max_w is not None
            else default_connection_max_w(imp, exp, envs)
        ),
        max_load_step_w=(
            site.max_load_step_w
            if site.max_load_step_w is not None
            else default_max_load_step_w(imp, exp, envs)
        ),
        limit_margin_w=(
            site.limit_margin_w
            if site.limit_margin_w is not None
            else default_limit_margin_w(imp, exp)
        ),
        dwell_s=cred.dwell_s,
        max_dwell_s=cred.max_dwell_s,
        settle_s=cred.settle_s,
        power_tolerance_ratio=cred.power_tolerance_ratio,
        frozen_soc_steps=cred.frozen_soc_steps,
        soc_tolerance=cred.soc_tolerance,
        heartbeat_stall_s=cred.heartbeat_stall_s,
    )


def soc_resolution(profile: Profile) -> float:
    """One register step of a profile's SoC, as a ratio (0.01 when the profile cannot say:
    a SunSpec scale factor read at run time, or no SoC register)."""
    name = profile.fields.get("soc")
    spec = next((r for r in profile.registers if r.name == name), None)
    if spec is None or spec.point is not None or spec.scale_factor is not None:
        return 0.01
    step = abs(spec.scale) / 100.0 if spec.unit == "%" else abs(spec.scale)
    return step if step > 0 else 0.01
