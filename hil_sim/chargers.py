"""Simulated EV chargers: the physical side (vehicles, meters, charging limits) and OCPP 1.6J /
2.0.1 charge-point clients built on the ``ocpp`` library's own ChargePoint class, talking to
essd's central system over real WebSockets.

Units: power W (> 0 the charger draws from the site), energy Wh, SoC ratio 0..1, time from
an injectable clock (epoch s). Integration is lazy, as in :mod:`hil_sim.battery`: the station
advances to ``clock.now()`` whenever it is touched.

The charger side of a charging profile: a TxProfile is accepted only for the running
transaction and in the unit the charger declares; it applies from ``validFrom`` to
``validTo`` (and for its schedule's ``duration``); outside that the charger falls back to its
own default limit, as a charger whose central system died must.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201
from websockets.typing import Subprotocol

from essd.clock import Clock


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: object, default: float) -> float:
    if not isinstance(text, str):
        return default
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


@dataclass(slots=True)
class SimVehicle:
    """An EV (or a swap pack on a slot charger): battery energy, on-board charger limit, and
    the SoC at which the car itself stops charging (its own charge limit setting)."""

    capacity_wh: float
    energy_wh: float
    max_power_w: float = 11_000.0
    efficiency: float = 0.92
    limit_soc: float = 1.0

    @property
    def full(self) -> bool:
        """True when the car takes no more energy."""
        return self.energy_wh >= self.limit_soc * self.capacity_wh - 1e-6

    @property
    def soc(self) -> float:
        """State of charge, ratio."""
        return self.energy_wh / self.capacity_wh


@dataclass(slots=True)
class SimEvse:
    """One connector/EVSE: its vehicle, running transaction, meter and profile."""

    vehicle: SimVehicle | None = None
    transaction_id: str | None = None
    meter_wh: float = 0.0  # AC energy register
    power_w: float = 0.0
    profile_limit_w: float | None = None
    profile_from: float = 0.0
    profile_to: float = 0.0
    profiles_rejected: int = 0
    # StartTransaction sent, its answer not yet read by the plug-in code (1.6): a real charger
    # has processed the answer before the central system's next message.
    starting: bool = False


@dataclass(slots=True)
class SimStation:
    """The physical charger: EVSEs, default limit, the unit it takes limits in."""

    id: str
    clock: Clock
    evses: dict[int, SimEvse] = field(default_factory=lambda: {1: SimEvse()})
    default_limit_w: float = 11_000.0
    rate_unit: str = "A"
    phases: int = 3
    voltage_v: float = 230.0
    last_update: float = math.nan

    def limit_w(self, evse_id: int) -> float:
        """The limit in force now: the profile's while valid, else the default."""
        evse = self.evses[evse_id]
        now = self.clock.now()
        if evse.profile_limit_w is not None and evse.profile_from <= now < evse.profile_to:
            return evse.profile_limit_w
        return self.default_limit_w

    def update(self) -> None:
        """Advance every EVSE to now: each vehicle charges at its limit until it is full."""
        now = self.clock.now()
        if math.isnan(self.last_update):
            self.last_update = now
        t = self.last_update
        while t < now:
            dt = min(now - t, 60.0)
            # Profile edges fall inside a step: the limit at the step's start applies to it.
            for evse_id, evse in self.evses.items():
                v = evse.vehicle
                if v is None or evse.transaction_id is None:
                    evse.power_w = 0.0
                    continue
                limit = self._limit_at(evse_id, t)
                top = v.limit_soc * v.capacity_wh
                room = max(top - v.energy_wh, 0.0) / v.efficiency / (dt / 3600.0)
                evse.power_w = max(min(limit, v.max_power_w, room), 0.0)
                v.energy_wh = min(v.energy_wh + evse.power_w * dt / 3600.0 * v.efficiency, top)
                evse.meter_wh += evse.power_w * dt / 3600.0
            t += dt
        self.last_update = now

    def _limit_at(self, evse_id: int, t: float) -> float:
        evse = self.evses[evse_id]
        if evse.profile_limit_w is not None and evse.profile_from <= t < evse.profile_to:
            return evse.profile_limit_w
        return self.default_limit_w

    def apply_profile(self, evse_id: int, profile: dict[str, Any], tx_id: object) -> bool:
        """Accept a TxProfile for the running transaction in the declared unit (snake_case)."""
        self.update()
        evse = self.evses.get(evse_id)
        if evse is not None and evse.starting and evse.transaction_id is None:
            evse.transaction_id = str(tx_id)
        if evse is None or evse.transaction_id is None or str(tx_id) != evse.transaction_id:
            if evse is not None:
                evse.profiles_rejected += 1
            return False
        if profile.get("charging_profile_purpose") != "TxProfile":
            evse.profiles_rejected += 1
            return False
        schedules = profile.get("charging_schedule")
        schedule: dict[str, Any] = (
            schedules[0] if isinstance(schedules, list) else schedules
        ) or {}
        periods = schedule.get("charging_schedule_period") or []
        if schedule.get("charging_rate_unit") != self.rate_unit or not periods:
            evse.profiles_rejected += 1
            return False
        now = self.clock.now()
        limit = float(periods[0]["limit"])
        phases = int(periods[0].get("number_phases", self.phases))
        limit_w = limit if self.rate_unit == "W" else limit * self.voltage_v * phases
        start = _epoch(profile.get("valid_from"), now)
        end = _epoch(profile.get("valid_to"), math.inf)
        if "duration" in schedule:
            end = min(
                end, _epoch(schedule.get("start_schedule"), now) + float(schedule["duration"])
            )
        evse.profile_limit_w, evse.profile_from, evse.profile_to = limit_w, start, end
        return True


class _Cp16(ChargePoint16):
    station: SimStation

    @on(Action16.set_charging_profile)
    def on_set_charging_profile(
        self, connector_id: int, cs_charging_profiles: dict[str, Any], **_: Any
    ) -> Any:
        ok = self.station.apply_profile(
            connector_id, cs_charging_profiles, cs_charging_profiles.get("transaction_id")
        )
        return result16.SetChargingProfile(status="Accepted" if ok else "Rejected")


class _Cp201(ChargePoint201):
    station: SimStation

    @on(Action201.set_charging_profile)
    def on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **_: Any
    ) -> Any:
        ok = self.station.apply_profile(
            evse_id, charging_profile, charging_profile.get("transaction_id")
        )
        return result201.SetChargingProfile(status="Accepted" if ok else "Rejected")


class ChargerLink:
    """One WebSocket connection of a :class:`SimStation` to a central system.

    ``version``: "1.6" or "2.0.1". Use as ``async with ChargerLink(...) as link``; leaving the
    block (or :meth:`drop`) closes the connection without stopping the station: a new link
    to the same station resumes its transactions, as a charger that lost its network does.
    """

    def __init__(
        self,
        station: SimStation,
        url: str,
        *,
        version: str = "1.6",
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._ssl = ssl_context
        self.station = station
        self.url = url.rstrip("/") + "/" + station.id
        self.version = version
        self.password = password
        self._ws: Any = None
        self._task: asyncio.Task[None] | None = None
        self.cp: Any = None
        self._tx_counter = 0

    async def __aenter__(self) -> ChargerLink:
        headers = {}
        if self.password is not None:
            token = base64.b64encode(f"{self.station.id}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        protocol = "ocpp1.6" if self.version == "1.6" else "ocpp2.0.1"
        self._ws = await websockets.connect(
            self.url,
            subprotocols=[Subprotocol(protocol)],
            additional_headers=headers,
            ssl=self._ssl,
        )
        cls = _Cp16 if self.version == "1.6" else _Cp201
        self.cp = cls(self.station.id, self._ws, response_timeout=5)
        self.cp.station = self.station
        self._task = asyncio.create_task(self._serve(), name=f"sim-charger-{self.station.id}")
        return self

    async def _serve(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.cp.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drop()

    async def drop(self) -> None:
        """Close the connection (the station and its sessions stay)."""
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def boot(self) -> Any:
        """BootNotification."""
        if self.version == "1.6":
            return await self.cp.call(
                call16.BootNotification(charge_point_model="SimAC", charge_point_vendor="essd-sim")
            )
        return await self.cp.call(
            call201.BootNotification(
                charging_station={"model": "SimAC", "vendor_name": "essd-sim"}, reason="PowerUp"
            )
        )

    async def heartbeat(self) -> Any:
        """Heartbeat."""
        mod = call16 if self.version == "1.6" else call201
        return await self.cp.call(mod.Heartbeat())

    async def status(self, evse_id: int, status: str) -> Any:
        """StatusNotification (1.6 status names; 2.0.1 connector status names)."""
        now = _iso(self.station.clock.now())
        if self.version == "1.6":
            return await self.cp.call(
                call16.StatusNotification(
                    connector_id=evse_id, error_code="NoError", status=status, timestamp=now
                )
            )
        return await self.cp.call(
            call201.StatusNotification(
                timestamp=now, connector_status=status, evse_id=evse_id, connector_id=1
            )
        )

    def _samples(self, evse_id: int) -> list[dict[str, Any]]:
        self.station.update()
        evse = self.station.evses[evse_id]
        values: list[tuple[str, float, str]] = [
            ("Energy.Active.Import.Register", evse.meter_wh, "Wh"),
            ("Power.Active.Import", evse.power_w, "W"),
        ]
        if evse.vehicle is not None:
            values.append(("SoC", evse.vehicle.soc * 100.0, "Percent"))
        if self.version == "1.6":
            return [{"value": f"{v:.1f}", "measurand": m, "unit": u} for m, v, u in values]
        return [
            {"value": round(v, 1), "measurand": m, "unit_of_measure": {"unit": u}}
            for m, v, u in values
        ]

    async def meter_values(self, evse_id: int) -> Any:
        """MeterValues with energy register, power and SoC."""
        entry = [
            {"timestamp": _iso(self.station.clock.now()), "sampled_value": self._samples(evse_id)}
        ]
        tx = self.station.evses[evse_id].transaction_id
        if self.version == "1.6":
            return await self.cp.call(
                call16.MeterValues(
                    connector_id=evse_id, meter_value=entry, transaction_id=int(tx) if tx else None
                )
            )
        return await self.cp.call(call201.MeterValues(evse_id=evse_id, meter_value=entry))

    async def plug_in(self, evse_id: int, vehicle: SimVehicle, id_tag: str = "SIMTAG") -> str:
        """A vehicle arrives: status, transaction start; returns the transaction id."""
        self.station.update()
        evse = self.station.evses[evse_id]
        evse.vehicle = vehicle
        now = _iso(self.station.clock.now())
        if self.version == "1.6":
            await self.status(evse_id, "Preparing")
            evse.starting = True
            result = await self.cp.call(
                call16.StartTransaction(
                    connector_id=evse_id,
                    id_tag=id_tag,
                    meter_start=int(evse.meter_wh),
                    timestamp=now,
                )
            )
            evse.transaction_id, evse.starting = str(result.transaction_id), False
            await self.status(evse_id, "Charging")
        else:
            await self.status(evse_id, "Occupied")
            self._tx_counter += 1
            evse.transaction_id = f"{self.station.id}-{self._tx_counter}"
            await self.cp.call(
                call201.TransactionEvent(
                    event_type="Started",
                    timestamp=now,
                    trigger_reason="CablePluggedIn",
                    seq_no=0,
                    transaction_info={
                        "transaction_id": evse.transaction_id,
                        "charging_state": "Charging",
                    },
                    evse={"id": evse_id, "connector_id": 1},
                    id_token={"id_token": id_tag, "type": "Central"},
                    meter_value=[{"timestamp": now, "sampled_value": self._samples(evse_id)}],
                )
            )
        # A round trip more (a heartbeat), as a charger's next message: whatever the central
        # system sent in answer to the start has arrived and been handled by then.
        await self.heartbeat()
        return evse.transaction_id

    async def unplug(self, evse_id: int) -> None:
        """The vehicle leaves: transaction stop, status available."""
        self.station.update()
        evse = self.station.evses[evse_id]
        now = _iso(self.station.clock.now())
        tx = evse.transaction_id
        if self.version == "1.6":
            await self.cp.call(
                call16.StopTransaction(
                    meter_stop=int(evse.meter_wh),
                    timestamp=now,
                    transaction_id=int(tx or 0),
                    reason="EVDisconnected",
                )
            )
        else:
            await self.cp.call(
                call201.TransactionEvent(
                    event_type="Ended",
                    timestamp=now,
                    trigger_reason="EVDeparted",
                    seq_no=1,
                    transaction_info={"transaction_id": tx, "stopped_reason": "EVDisconnected"},
                    evse={"id": evse_id, "connector_id": 1},
                    meter_value=[{"timestamp": now, "sampled_value": self._samples(evse_id)}],
                )
            )
        await self.status(evse_id, "Available")
        evse.vehicle, evse.transaction_id, evse.profile_limit_w = None, None, None
