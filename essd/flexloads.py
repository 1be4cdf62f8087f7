"""The control layer's side of EV charging: what a charger adapter (the OCPP central system)
provides and takes, the users' session requests, learned departures, and the sessions the
dispatch LP plans (:class:`essd.dispatch.sessions.FlexSession`).

Units: power W (a vehicle's charge power > 0 here: it is what the charger draws), energy Wh,
SoC ratio 0..1, times epoch s. The LP's plan uses the battery sign (< 0 charges); the
conversion happens once, in :func:`charge_limits_w`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from essd.commands import CommandRejected
from essd.devices import ManagedDevice
from essd.dispatch.sessions import FlexSession, presence_now
from essd.domain import Plan, Setpoint
from essd.events import SwapStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PluggedVehicle:
    """A vehicle (or pack) on a charger now, as the adapter sees it.

    ``session_id``: the charger's transaction id; ``delivered_wh``: AC energy since it started;
    ``soc``: NaN unless the charger reports it; power limits are the charger's (W).
    """

    charger_id: str
    session_id: str
    plugged_at: float
    delivered_wh: float
    max_power_w: float
    min_power_w: float = 0.0
    max_discharge_w: float = 0.0
    soc: float = math.nan
    power_w: float = math.nan
    default_energy_wh: float = 20_000.0
    default_dwell_s: float = 8 * 3600.0


class ChargerPort(Protocol):
    """What the cycle needs from a charger adapter (the OCPP central system implements it)."""

    def plugged(self) -> Sequence[PluggedVehicle]:
        """Vehicles connected with a running session now."""

    def apply(self, limits_w: Mapping[str, float], *, valid_s: float) -> None:
        """Ask each charger (by id) to draw at most ``limits_w`` W, valid for ``valid_s`` s.

        Non-blocking: the adapter sends in the background; a charger that does not renew
        falls back to its own default limit when the validity ends.
        """


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A user's request for the session on one charger (MQTT ``cmd/session`` or HA).

    Either ``energy_wh`` (battery energy wanted in total for the session) or ``target_soc``
    with ``capacity_wh``; ``departure_s`` when the vehicle leaves. Missing fields fall back
    to the learned departure and the charger's default energy.
    """

    charger_id: str
    departure_s: float | None = None
    energy_wh: float | None = None
    target_soc: float | None = None
    capacity_wh: float | None = None
    set_at: float = 0.0


@dataclass(slots=True)
class DepartureLearner:
    """Learns how long vehicles stay on each charger, per hour of arrival (UTC), by EWMA.

    ``predict`` returns None until the charger has seen a session at that hour or any hour.
    """

    weight: float = 0.3
    dwell_s: dict[str, dict[int, float]] = field(default_factory=dict)

    def observe(self, charger_id: str, arrival_s: float, departure_s: float) -> None:
        """Record one finished session."""
        stay = departure_s - arrival_s
        if not (math.isfinite(stay) and 60.0 <= stay <= 7 * 86_400.0):
            return  # a blip or a clock jump is not a stay
        hours = self.dwell_s.setdefault(charger_id, {})
        hour = int(arrival_s // 3600) % 24
        old = hours.get(hour)
        hours[hour] = stay if old is None else old + self.weight * (stay - old)

    def state(self) -> dict[str, dict[str, float]]:
        """JSON-ready: charger -> hour of arrival (as text) -> learned stay (s)."""
        return {c: {str(h): s for h, s in hours.items()} for c, hours in self.dwell_s.items()}

    @classmethod
    def from_state(cls, data: object) -> DepartureLearner:
        """Take back :meth:`state`; raises ValueError naming the field when it does not fit."""
        learner = cls()
        if data is None:
            return learner
        if not isinstance(data, dict):
            raise ValueError("departures: must be an object")
        for charger, hours in data.items():
            if not isinstance(hours, dict):
                raise ValueError(f"departures.{charger}: must be an object")
            for hour, stay in hours.items():
                ok = str(hour).isdigit() and 0 <= int(hour) < 24
                if not ok or isinstance(stay, bool) or not isinstance(stay, int | float):
                    raise ValueError(f"departures.{charger}.{hour}: not an hour and a stay")
                if not (math.isfinite(stay) and 60.0 <= stay <= 7 * 86_400.0):
                    raise ValueError(f"departures.{charger}.{hour}: stay out of range")
                learner.dwell_s.setdefault(str(charger), {})[int(hour)] = float(stay)
        return learner

    def predict(self, charger_id: str, arrival_s: float) -> float | None:
        """Expected stay (s) of a vehicle arriving at ``arrival_s`` on ``charger_id``."""
        hours = self.dwell_s.get(charger_id)
        if not hours:
            return None
        hour = int(arrival_s // 3600) % 24
        if hour in hours:
            return hours[hour]
        return sum(hours.values()) / len(hours)


@dataclass(slots=True)
class SessionBook:
    """Turns plugged vehicles, requests and learned stays into the LP's sessions."""

    learner: DepartureLearner = field(default_factory=DepartureLearner)
    requests: dict[str, SessionRequest] = field(default_factory=dict)
    _seen: dict[str, PluggedVehicle] = field(default_factory=dict)

    def request(self, req: SessionRequest) -> None:
        """Set (replace) the request for ``req.charger_id``."""
        self.requests[req.charger_id] = req

    def sessions(self, plugged: Sequence[PluggedVehicle], now: float) -> list[FlexSession]:
        """The sessions to plan now; vehicles gone since the last call teach the learner."""
        current = {v.charger_id: v for v in plugged}
        for charger_id, old in list(self._seen.items()):
            new = current.get(charger_id)
            if new is None or new.session_id != old.session_id:
                self.learner.observe(charger_id, old.plugged_at, now)
                self.requests.pop(charger_id, None)
                del self._seen[charger_id]
        out = []
        for v in plugged:
            self._seen[v.charger_id] = v
            req = self.requests.get(v.charger_id)
            out.append(self._session(v, req, now))
        return out

    def _session(self, v: PluggedVehicle, req: SessionRequest | None, now: float) -> FlexSession:
        departure = req.departure_s if req is not None else None
        if departure is None:
            stay = self.learner.predict(v.charger_id, v.plugged_at)
            departure = v.plugged_at + (stay if stay is not None else v.default_dwell_s)
        eta = 0.92
        wanted = v.default_energy_wh
        if req is not None and req.energy_wh is not None:
            wanted = req.energy_wh
        elif req is not None and req.target_soc is not None and req.capacity_wh is not None:
            if math.isfinite(v.soc):
                # The SoC is live: what is missing now, nothing about what was delivered.
                wanted = max(req.target_soc - v.soc, 0.0) * req.capacity_wh
                wanted += v.delivered_wh * eta
            else:
                wanted = req.target_soc * req.capacity_wh
        needed = max(wanted - v.delivered_wh * eta, 0.0)
        return FlexSession(
            id=f"{v.charger_id}/{v.session_id}",
            charger_id=v.charger_id,
            arrival_s=min(v.plugged_at, now),
            departure_s=max(departure, now + 1.0),
            energy_needed_wh=needed,
            max_power_w=v.max_power_w,
            min_power_w=v.min_power_w,
            max_discharge_w=v.max_discharge_w,
            v2g_energy_wh=10_000.0 if v.max_discharge_w > 0 else 0.0,
            charge_efficiency=eta,
        )


def charge_limits_w(
    plan: Plan, sessions: Sequence[FlexSession], *, headroom_w: float = 0.0
) -> dict[str, float]:
    """Per charger, the charge power (W >= 0) the plan's first step asks for.

    A charger cannot run below its minimum power. A plan below it rounds up to the minimum
    while ``headroom_w`` (the site import limit minus the plan's first-step grid, W) still
    takes the difference, else down to 0 (a pause; the next solve plans the missing energy
    later). Rounding up matters at the end of a session, when what is left is less than the
    minimum for one step. A plan without session power (a lower rung) gives no limit: see
    :func:`fallback_limits_w`.
    """
    out: dict[str, float] = {}
    spare = max(headroom_w, 0.0)
    for s in sessions:
        steps = plan.session_power_w.get(s.id)
        if not steps:
            continue
        # The plan's first step is an average over the step; a vehicle leaving within it must
        # get that energy while it is there.
        share = presence_now(s, plan.created_at, plan.step_s)
        want = min(max(-steps[0], 0.0) / share, s.max_power_w) if share > 0 else 0.0
        if 0.0 < want < s.min_power_w:
            if s.min_power_w - want <= spare and s.energy_needed_wh > 0:
                spare -= s.min_power_w - want
                want = s.min_power_w
            else:
                want = 0.0
        out[s.charger_id] = out.get(s.charger_id, 0.0) + want
    return out


def fallback_limits_w(sessions: Sequence[FlexSession], headroom_w: float) -> dict[str, float]:
    """Per charger, an equal share of the site's import headroom (W), within its own limit.

    For the cycles without an optimized plan (lower rungs): the vehicles keep charging, and the
    site import limit still holds. A charger whose share is below its minimum gets 0.
    """
    if not sessions:
        return {}
    share = max(headroom_w, 0.0) / len(sessions)
    out: dict[str, float] = {}
    for s in sessions:
        want = min(share, s.max_power_w) if s.energy_needed_wh > 0 else 0.0
        out[s.charger_id] = want if want >= s.min_power_w else 0.0
    return out


def clamp_to_headroom(
    limits_w: Mapping[str, float], sessions: Sequence[FlexSession], headroom_w: float
) -> dict[str, float]:
    """Scale the chargers' limits down so their sum fits ``headroom_w`` (W: the site import
    limit minus what the meter says the rest of the site draws now), the closed-loop check a
    plan made from forecasts needs. A limit scaled below its charger's minimum becomes 0.
    """
    total = sum(limits_w.values())
    if total <= max(headroom_w, 0.0):
        return dict(limits_w)
    scale = max(headroom_w, 0.0) / total
    minimum = {s.charger_id: s.min_power_w for s in sessions}
    out = {}
    for cid, w in limits_w.items():
        v = w * scale
        out[cid] = v if v >= minimum.get(cid, 0.0) else 0.0
    return out


class FlexLoads:
    """The cycle's link to a charger adapter: sessions for the LP, limits for the chargers,
    users' requests, and the chargers' own draw (kept out of the learned site load).

    ``chargers`` maps each charger id (``id:N`` for a second connector) to nothing more than
    its presence: the adapter knows the limits. One LP column per charger.

    ``devices``: slot devices the write phase writes (:meth:`setpoints`) and the controller
    keeps out of its batteries; none for OCPP chargers (the adapter sends their limits).
    """

    devices: tuple[ManagedDevice, ...] = ()

    def __init__(
        self,
        port: ChargerPort,
        charger_ids: Sequence[str],
        *,
        import_limit_w: float | None,
        profile_validity_s: float,
    ) -> None:
        self.port = port
        self.charger_ids = tuple(charger_ids)
        self.columns = max(len(self.charger_ids), 1)
        self.book = SessionBook()
        self._import_limit_w = import_limit_w
        self._validity_s = profile_validity_s
        self._sessions: list[FlexSession] = []
        self._overfull = False
        self._unplanned: list[str] = []
        self.last_limits_w: dict[str, float] = {}

    def request(
        self,
        charger: str,
        departure_s: float | None,
        energy_wh: float | None,
        target_soc: float | None,
        capacity_wh: float | None,
    ) -> None:
        """A user's session request (``cmd/session``); an unknown charger is refused."""
        if charger not in self.charger_ids:
            raise CommandRejected(f"charger: unknown charger {charger!r}")
        self.book.request(SessionRequest(charger, departure_s, energy_wh, target_soc, capacity_wh))

    def sessions(self, now: float) -> list[FlexSession]:
        """The sessions to plan this cycle (at most one per column)."""
        sessions = self.book.sessions(self.port.plugged(), now)
        # Connectors whose vehicle the plan has no column for are paused (sent 0 W).
        self._unplanned = [s.charger_id for s in sessions[self.columns :]]
        if len(sessions) > self.columns and not self._overfull:
            log.warning(
                "chargers: %d sessions but %d configured connectors; the rest are paused",
                len(sessions),
                self.columns,
            )
        self._overfull = len(sessions) > self.columns
        self._sessions = sessions[: self.columns]
        return list(self._sessions)

    def drawn_w(self) -> float:
        """What the chargers draw now (W), as they last reported it (0 when unknown)."""
        total = 0.0
        for v in self.port.plugged():
            total += v.power_w if math.isfinite(v.power_w) else 0.0
        return total

    def apply(self, plan: Plan, site_other_w: float | None) -> dict[str, float]:
        """Send the chargers their limits for this cycle; returns them (W).

        ``site_other_w``: what the rest of the site draws now (grid minus the chargers' own
        draw; None when the meter is not valid). With an optimized plan the limits are its
        first step; otherwise the import headroom shared equally. Either way their sum is
        clamped to the headroom the meter shows (without a valid meter: 0 W, the chargers
        pause; the profile validity makes a charger fall back on its own if essd stops).
        """
        sessions = self._sessions
        limit = self._import_limit_w
        if site_other_w is None:
            headroom = 0.0
        elif limit is None:
            headroom = math.inf
        else:
            headroom = limit - site_other_w
        if plan.session_power_w:
            known = limit is not None and site_other_w is not None
            spare = limit - plan.grid_w[0] if known and limit is not None else 0.0
            limits = charge_limits_w(plan, sessions, headroom_w=min(spare, 1e9))
        else:
            limits = fallback_limits_w(sessions, min(headroom, 1e9))
        limits = clamp_to_headroom(limits, sessions, min(headroom, 1e9))
        limits |= dict.fromkeys(self._unplanned, 0.0)
        self.last_limits_w = limits
        self.port.apply(limits, valid_s=self._validity_s)
        return limits

    def setpoints(self, mono: float, ttl_s: float) -> dict[str, Setpoint]:
        """Setpoints for :attr:`devices` (none: OCPP chargers get their limits in apply)."""
        return {}

    def status(self, now: float) -> SwapStatus | None:
        """A swap station's packs vs its service level (None: not a swap station)."""
        return None

    def durable(self) -> dict[str, Any]:
        """What survives a restart (the learned departures), JSON-ready."""
        return {"departures": self.book.learner.state()}

    def parse_state(self, data: Mapping[str, Any]) -> Callable[[], None]:
        """Check :meth:`durable` data; returns what takes it back (ValueError naming the field)."""
        learned = DepartureLearner.from_state(data.get("departures"))

        def commit() -> None:
            self.book.learner = learned

        return commit
