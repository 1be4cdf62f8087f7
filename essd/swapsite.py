"""The battery-swap station as a site type of the daemon (``[swap_station]``).

Each slot is a device (profile ``rack-bms-slot`` or any storage profile with a charge limit)
that reads the docked pack's SoC and takes a charge limit. The controller does not treat the
slots as site batteries: every cycle :class:`SwapStation` turns the packs' SoC and the swap
forecast into deadline sessions (:func:`essd.dispatch.swap.swap_sessions`) that the LP plans
as flexible loads beside any stationary battery and under the site import limit; the plan's
first step becomes each slot's charge limit, written through the slot's ManagedDevice (the
write phase: standby and faults write its safe mode). A swap is seen in the readings (a
charged pack's SoC falls by ``swap_drop_soc`` or more between two reads) and teaches the
demand learner, which is durable state.

Units: power W (a slot's charge power > 0 here; setpoints in the battery sign), energy Wh,
SoC ratio 0..1, times epoch s, demand in swaps per hour.
"""

from __future__ import annotations

import bisect
import csv
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from essd.config import Settings
from essd.config_ev import SwapStationConfig
from essd.credibility import default_limit_margin_w
from essd.devices import ManagedDevice
from essd.dispatch.sessions import FlexSession
from essd.dispatch.swap import PackState, SwapDemandLearner, SwapStationSpec, swap_sessions
from essd.domain import BatteryReading, Plan, Setpoint
from essd.events import SwapStatus
from essd.flexloads import FlexLoads, PluggedVehicle
from essd.series import SeriesError, parse_series_time

log = logging.getLogger(__name__)


def read_swap_series(path: Path, tz: ZoneInfo) -> tuple[list[float], list[float]]:
    """Times (epoch s, increasing) and swaps per hour from a CSV with columns ``time`` and
    ``swaps_per_hour`` (each value holds until the next time). SeriesError names file, line
    and column."""
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines()))
    except OSError as exc:
        raise SeriesError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SeriesError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not rows:
        raise SeriesError(f"{path}: no data rows")
    for column in ("time", "swaps_per_hour"):
        if column not in rows[0]:
            raise SeriesError(f"{path}: {column}: column missing")
    times: list[float] = []
    rates: list[float] = []
    for i, row in enumerate(rows, start=2):
        t = parse_series_time(row["time"] or "", tz, f"{path}: line {i}: time")
        try:
            v = float(row["swaps_per_hour"] or "")
        except ValueError:
            raise SeriesError(f"{path}: line {i}: swaps_per_hour: not a number") from None
        if not (math.isfinite(v) and v >= 0):
            raise SeriesError(f"{path}: line {i}: swaps_per_hour: must be a number >= 0")
        if times and t <= times[-1]:
            raise SeriesError(f"{path}: line {i}: time: must be strictly increasing")
        times.append(t)
        rates.append(v)
    return times, rates


def demand_from_state(data: object, prior: float) -> SwapDemandLearner:
    """A learner from :meth:`SwapStation.durable` data; ValueError naming the field."""
    learner = SwapDemandLearner(prior_per_hour=prior)
    if data is None:
        return learner
    if not isinstance(data, dict) or not isinstance(data.get("rate"), dict):
        raise ValueError("swap_demand: must be an object with a rate per hour")
    for hour, rate in data["rate"].items():
        ok = str(hour).isdigit() and 0 <= int(hour) < 24 and not isinstance(rate, bool)
        if not ok or not isinstance(rate, int | float) or not (0 <= rate < 1e6):
            raise ValueError(f"swap_demand.rate.{hour}: not an hour and a rate >= 0")
        learner.rate[int(hour)] = float(rate)
    return learner


def _docked(r: BatteryReading) -> bool:
    """False only when the slot reads ``pack_present`` 0 (an empty slot's SoC means nothing)."""
    present = r.extras.get("pack_present")
    return present is None or not present.valid or present.value is None or present.value >= 0.5


class _SlotPort:
    """The slots as a charger port: the packs they read, the limits the plan gives them."""

    def __init__(self, slots: Sequence[ManagedDevice]) -> None:
        self.slots = tuple(slots)
        self.limits_w: dict[str, float] = {}

    def readings(self) -> dict[str, BatteryReading]:
        """Fresh, valid readings of the slots whose data the device trusts now."""
        out = {}
        for d in self.slots:
            r = d.last
            ok = d.healthy and isinstance(r, BatteryReading) and r.soc.valid and r.available
            if ok and isinstance(r, BatteryReading) and _docked(r):
                out[d.id] = r
        return out

    def plugged(self) -> list[PluggedVehicle]:
        out = []
        for d in self.slots:
            r = self.readings().get(d.id)
            if r is None or d.envelope is None:
                continue
            draw = -r.power_w.value if r.power_w.valid and r.power_w.value is not None else 0.0
            out.append(
                PluggedVehicle(
                    d.id,
                    "pack",
                    0.0,
                    0.0,
                    d.envelope.max_charge_w,
                    soc=r.soc.value or 0.0,
                    power_w=max(draw, 0.0),
                )
            )
        return out

    def apply(self, limits_w: Mapping[str, float], *, valid_s: float) -> None:
        self.limits_w = dict(limits_w)


class SwapStation(FlexLoads):
    """The cycle's link to a swap station's slots (see the module text)."""

    def __init__(
        self,
        cfg: SwapStationConfig,
        slots: Sequence[ManagedDevice],
        *,
        import_limit_w: float | None,
        step_s: float,
        horizon_steps: int,
        series: tuple[list[float], list[float]] | None = None,
    ) -> None:
        self.port_slots = _SlotPort(slots)
        super().__init__(
            self.port_slots,
            [d.id for d in slots],
            import_limit_w=import_limit_w,
            profile_validity_s=step_s,
        )
        self.cfg = cfg
        self.devices = tuple(slots)
        self.columns = 2 * len(slots)  # the packs docked now, and as many docked later
        self.spec = SwapStationSpec(
            cfg.service_level, cfg.target_soc, cfg.arrival_soc, cfg.demand_margin, cfg.demand_z
        )
        self.learner = SwapDemandLearner(cfg.demand_weight, cfg.demand_prior_per_hour)
        self.series = series
        self.step_s, self.horizon_steps = step_s, horizon_steps
        self.swaps_total = 0
        self._soc: dict[str, tuple[float, float]] = {}  # slot -> (read_at_mono, soc)
        self._failures: set[str] = set()

    def observe(self, now: float) -> None:
        """Detect swaps in the slots' new readings and book them (once per reading): a charged
        pack taken out (``pack_present`` 0) or replaced between two reads (its SoC fell by
        ``swap_drop_soc`` or more)."""
        target = self.cfg.target_soc
        for d in self.devices:
            r = d.last
            if not (d.healthy and isinstance(r, BatteryReading)):
                continue
            last = self._soc.get(d.id)
            if last is not None and last[0] == r.read_at_mono:
                continue
            out = not _docked(r)
            soc = r.soc.value if r.soc.valid and not out else None
            if soc is None and not out:
                continue  # an unreadable SoC says nothing: keep the last one
            was = last[1] if last is not None else math.nan
            replaced = soc is not None and was - soc >= self.cfg.swap_drop_soc
            if was >= target and (out or replaced):
                self.learner.observe(now)
                self.swaps_total += 1
            self._soc[d.id] = (r.read_at_mono, math.nan if soc is None else soc)
        self.learner.close_hour(now)

    def demand(self, start: float, steps: int) -> list[float]:
        """Expected swaps in each step from ``start`` (learned, or held from the series)."""
        if self.series is None:
            return self.learner.forecast(start, self.step_s, steps)
        times, rates = self.series
        out = []
        for i in range(steps):
            j = bisect.bisect_right(times, start + self.step_s * (i + 0.5)) - 1
            out.append(rates[max(j, 0)] * self.step_s / 3600.0)
        return out

    def _packs(self) -> list[PackState]:
        out = []
        for d in self.devices:
            r = self.port_slots.readings().get(d.id)
            if r is None or d.envelope is None or r.soc.value is None:
                continue
            capacity = self.cfg.pack_capacity_wh or d.envelope.capacity_wh
            out.append(
                PackState(
                    d.id,
                    r.soc.value,
                    capacity,
                    d.envelope.max_charge_w,
                    d.envelope.charge_efficiency,
                )
            )
        return out

    def sessions(self, now: float) -> list[FlexSession]:
        """The packs' deadline sessions for this cycle's plan."""
        self.observe(now)
        sessions = swap_sessions(
            self.spec,
            self._packs(),
            self.demand(now, self.horizon_steps),
            now=now,
            step_s=self.step_s,
            columns=self.columns,
        )
        self._sessions, self._unplanned = sessions, []
        return list(sessions)

    def apply(self, plan: Plan, site_other_w: float | None) -> dict[str, float]:
        """The slots' limits from the plan (a slot without a pack or a plan: 0 W)."""
        limits = super().apply(plan, site_other_w)
        self.last_limits_w = {d.id: self.limit_w(d) for d in self.devices}
        return limits

    def limit_w(self, d: ManagedDevice) -> float:
        """A slot's charge limit now: the plan's, within the slot's rating, live limit and
        SoC window (0 W at or above its max SoC, or without a credible reading)."""
        r = self.port_slots.readings().get(d.id)
        env = d.envelope
        if r is None or env is None or r.soc.value is None or r.soc.value >= env.max_soc:
            return 0.0
        want = self.port_slots.limits_w.get(d.id, 0.0)
        cap = env.max_charge_w
        if r.limits is not None:
            cap = min(cap, r.limits.max_charge_w)
        return max(0.0, min(want, cap)) if math.isfinite(want) else 0.0

    def setpoints(self, mono: float, ttl_s: float) -> dict[str, Setpoint]:
        """Each slot's charge limit as a setpoint (battery sign) for the write phase; never
        raises (a failure gives every slot 0 W: the packs rest)."""
        try:
            return self._setpoints(mono, ttl_s)
        except Exception as exc:
            self._failed("setpoints", exc)
            return {d.id: Setpoint(d.id, 0.0, mono, ttl_s, "swap") for d in self.devices}

    def _failed(self, what: str, exc: Exception) -> None:
        if what not in self._failures:
            self._failures.add(what)
            log.error(
                "swap station: %s failed (slots paused): %s: %s", what, type(exc).__name__, exc
            )

    def _setpoints(self, mono: float, ttl_s: float) -> dict[str, Setpoint]:
        return {
            d.id: Setpoint(d.id, -self.last_limits_w.get(d.id, 0.0), mono, ttl_s, "swap")
            for d in self.devices
        }

    def status(self, now: float) -> SwapStatus | None:
        """Packs ready vs the service level, for the cycle record and the metrics; never
        raises (None on a failure)."""
        try:
            return self._status(now)
        except Exception as exc:
            self._failed("status", exc)
            return None

    def _status(self, now: float) -> SwapStatus:
        self.observe(now)
        socs = [r.soc.value for r in self.port_slots.readings().values() if r.soc.value is not None]
        return SwapStatus(
            packs_ready=sum(s >= self.cfg.target_soc for s in socs),
            packs=len(socs),
            service_level=self.cfg.service_level,
            swaps_total=self.swaps_total,
            demand_per_hour=self.demand(now, 1)[0] * 3600.0 / self.step_s,
        )

    def durable(self) -> dict[str, Any]:
        """The learned swap demand (per hour of the day), JSON-ready."""
        return {"swap_demand": {"rate": {str(h): v for h, v in self.learner.rate.items()}}}

    def parse_state(self, data: Mapping[str, Any]) -> Callable[[], None]:
        """Check :meth:`durable` data; returns what takes it back (ValueError naming the field)."""
        learned = demand_from_state(data.get("swap_demand"), self.cfg.demand_prior_per_hour)

        def commit() -> None:
            self.learner.rate = learned.rate

        return commit


def swap_station(settings: Settings, devices: Sequence[ManagedDevice]) -> SwapStation:
    """The site's swap station from ``[swap_station]`` and its slot devices (already built).

    Raises ValueError (a slot that is not a storage device essd can charge) or SeriesError
    (the demand series file), each naming the field or the file.
    """
    cfg = settings.swap_station
    assert cfg is not None
    by_id = {d.id: d for d in devices}
    slots = []
    for i, sid in enumerate(cfg.slots):
        d = by_id.get(sid)
        if d is None or d.envelope is None or not d.envelope.can_charge:
            raise ValueError(f"swap_station.slots.{i}: {sid!r} is not a device essd can charge")
        slots.append(d)
    series = None
    if cfg.demand == "series" and cfg.demand_series_file is not None:
        series = read_swap_series(cfg.demand_series_file, ZoneInfo(settings.site.timezone))
    ctl, site = settings.control, settings.site
    # The slots' closed-loop clamp keeps the site's limit margin (meter error, load steps).
    margin = site.limit_margin_w
    if margin is None:
        margin = default_limit_margin_w(site.grid_import_limit_w, site.grid_export_limit_w)
    return SwapStation(
        cfg,
        slots,
        import_limit_w=max(site.grid_import_limit_w - margin, 0.0),
        step_s=ctl.step_s,
        horizon_steps=ctl.horizon_steps,
        series=series,
    )
