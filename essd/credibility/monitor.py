"""One cycle of credibility: every unit and the meter judged, and what the guard may believe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from essd.credibility.meter import MeterTrack, assess_meter
from essd.credibility.types import (
    CredibilityInput,
    CredibilityReport,
    CredibilitySettings,
    UnitVerdict,
)
from essd.credibility.unit import UnitTrack, assess_unit
from essd.domain import BatteryReading, Quality, Reading
from essd.safety import GuardInput, side_margin


@dataclass(frozen=True, slots=True)
class CredibilityState:
    """Everything the rules remember between cycles (start with ``CredibilityState()``)."""

    units: Mapping[str, UnitTrack] = field(default_factory=dict)
    meter: MeterTrack = field(default_factory=MeterTrack)


def assess(
    cfg: CredibilitySettings, state: CredibilityState, inp: CredibilityInput
) -> tuple[CredibilityState, CredibilityReport]:
    """Judge one cycle's readings; returns the state for the next cycle and the verdicts."""
    tracks: dict[str, UnitTrack] = {}
    verdicts: dict[str, UnitVerdict] = {}
    for dev_id, env in inp.envelopes.items():
        track, verdict = assess_unit(
            cfg,
            state.units.get(dev_id, UnitTrack()),
            env,
            reading=inp.readings.get(dev_id),
            cmd=inp.commanded_w.get(dev_id),
            now=inp.now_mono,
            resolution=inp.soc_resolution.get(dev_id, 0.01),
        )
        tracks[dev_id], verdicts[dev_id] = track, verdict
    # The batteries' best estimate for the meter's net load: a settling unit at the middle of
    # its band (its reading may lag or be stuck, its command may not be reached yet).
    battery_w = 0.0
    for dev_id, v in verdicts.items():
        r = inp.readings.get(dev_id)
        if not v.credible or r is None or not r.power_w.valid or r.power_w.value is None:
            continue
        band = v.power_band_w
        battery_w += r.power_w.value if band is None else (band[0] + band[1]) / 2.0
    hidden = min(
        side_margin(cfg.limit_margin_w, inp.import_limit_w),
        side_margin(cfg.limit_margin_w, inp.export_limit_w),
    )
    meter_track, meter = assess_meter(cfg, state.meter, inp.grid_power_w, battery_w, hidden)
    report = CredibilityReport(verdicts, meter, cfg.limit_margin_w)
    return CredibilityState(tracks, meter_track), report


def screen_guard_input(inp: GuardInput, report: CredibilityReport) -> GuardInput:
    """``inp`` as the guard may believe it: units not credible unhealthy, their power and SoC
    replaced, the meter dropped when implausible, the limit margin and power bands added."""
    readings: dict[str, BatteryReading] = dict(inp.readings)
    healthy = dict(inp.healthy)
    bands: dict[str, tuple[float, float]] = dict(inp.power_band_w)
    soc_bands: dict[str, tuple[float, float]] = dict(inp.soc_band)
    for dev_id, v in report.units.items():
        if v.power_band_w is not None:
            bands[dev_id] = v.power_band_w
        if v.soc_band is not None:
            soc_bands[dev_id] = v.soc_band
        r = readings.get(dev_id)
        if v.credible or r is None:
            continue
        healthy[dev_id] = False
        why = f"not credible: {v.cause.value if v.cause else 'held'}"
        soc = r.soc
        if v.soc_band is not None:
            soc = Reading(v.soc_band[0], r.soc.unit, r.soc.read_at_mono)
        readings[dev_id] = replace(
            r,
            soc=soc,
            power_w=Reading(r.power_w.value, r.power_w.unit, r.read_at_mono, Quality.STALE, why),
        )
    return replace(
        inp,
        readings=readings,
        healthy=healthy,
        grid_power_w=report.meter.grid_power_w,
        limit_margin_w=max(inp.limit_margin_w, report.limit_margin_w),
        power_band_w=bands,
        soc_band=soc_bands,
    )


@dataclass(frozen=True, slots=True)
class Screened:
    """A screened guard input and the report it came from."""

    guard_input: GuardInput
    report: CredibilityReport


class CredibilityMonitor:
    """Keeps the credibility state across cycles; the rules themselves are :func:`assess`."""

    def __init__(
        self, settings: CredibilitySettings, soc_resolution: Mapping[str, float] | None = None
    ) -> None:
        self.settings = settings
        self.soc_resolution = dict(soc_resolution or {})
        self.state = CredibilityState()
        self.last: CredibilityReport | None = None

    def screen(self, inp: GuardInput, commanded_w: Mapping[str, float | None]) -> Screened:
        """Judge this cycle's readings and return what the guard may believe."""
        self.state, report = assess(
            self.settings,
            self.state,
            CredibilityInput(
                now_mono=inp.now_mono,
                envelopes=inp.envelopes,
                readings=inp.readings,
                commanded_w=commanded_w,
                grid_power_w=inp.grid_power_w,
                soc_resolution=self.soc_resolution,
                import_limit_w=inp.import_limit_w,
                export_limit_w=inp.export_limit_w,
            ),
        )
        self.last = report
        return Screened(screen_guard_input(inp, report), report)
