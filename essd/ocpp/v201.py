"""OCPP 2.0.1: the central system's handler for one connected charging station.

Reads: BootNotification, Heartbeat, StatusNotification, MeterValues, TransactionEvent
(Started / Updated / Ended; the station chooses the transaction id, so a station that
reconnects mid-session resumes the same transaction), Authorize (accepted).
Controls: SetChargingProfile with a TxProfile for the EVSE's running transaction, its limit in
the unit the station declared and ``validTo`` = now + the profile validity.
Connectors are recorded per EVSE id.
"""

from __future__ import annotations

import math
from typing import Any

from ocpp.routing import after, on
from ocpp.v201 import ChargePoint, call, call_result
from ocpp.v201.enums import Action, AuthorizationStatusEnumType, RegistrationStatusEnumType

from essd.ocpp.common import PROFILE_ID_BASE, ChargerContext, ChargerHandler, iso
from essd.ocpp.registry import ConnectorInfo, parse_meter_values, parse_time


def _token(id_token: object) -> str:
    if isinstance(id_token, dict):
        return str(id_token.get("id_token", ""))
    return ""


class V201Charger(ChargerHandler, ChargePoint):
    """One OCPP 2.0.1 charging station connected to essd."""

    def __init__(self, ctx: ChargerContext, connection: Any, *, response_timeout_s: float) -> None:
        super().__init__(ctx.record.id, connection, response_timeout=response_timeout_s)
        self.ctx = ctx

    @on(Action.boot_notification)
    def on_boot_notification(
        self, charging_station: dict[str, Any], reason: str, **_: Any
    ) -> call_result.BootNotification:
        rec = self.ctx.record
        rec.vendor = str(charging_station.get("vendor_name", ""))
        rec.model = str(charging_station.get("model", ""))
        return call_result.BootNotification(
            current_time=iso(self._now()),
            interval=self.ctx.heartbeat_interval_s,
            status=RegistrationStatusEnumType.accepted,
        )

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=iso(self._now()))

    @on(Action.status_notification)
    def on_status_notification(
        self, timestamp: str, connector_status: str, evse_id: int, connector_id: int, **_: Any
    ) -> call_result.StatusNotification:
        at = parse_time(timestamp, self._now())
        self.ctx.record.connectors[evse_id] = ConnectorInfo(connector_status, "NoError", at)
        return call_result.StatusNotification()

    @on(Action.meter_values)
    def on_meter_values(
        self, evse_id: int, meter_value: list[Any], **_: Any
    ) -> call_result.MeterValues:
        rec = self.ctx.record
        rec.meter[evse_id] = parse_meter_values(meter_value, self._now(), rec.meter.get(evse_id))
        return call_result.MeterValues()

    @on(Action.authorize)
    def on_authorize(self, id_token: dict[str, Any], **_: Any) -> call_result.Authorize:
        return call_result.Authorize(id_token_info={"status": AuthorizationStatusEnumType.accepted})

    @on(Action.transaction_event)
    def on_transaction_event(
        self, event_type: str, timestamp: str, transaction_info: dict[str, Any], **kw: Any
    ) -> call_result.TransactionEvent:
        ctx, rec = self.ctx, self.ctx.record
        t = parse_time(timestamp, self._now())
        tx_id = str(transaction_info.get("transaction_id", ""))
        evse = kw.get("evse")
        known = rec.transactions.get(tx_id)
        evse_id = int(evse.get("id", 1)) if isinstance(evse, dict) else None
        if evse_id is None:
            evse_id = known.connector_id if known is not None else 1
        if kw.get("meter_value"):
            rec.meter[evse_id] = parse_meter_values(
                kw["meter_value"], self._now(), rec.meter.get(evse_id)
            )
        energy = rec.meter[evse_id].energy_wh if evse_id in rec.meter else math.nan
        if event_type in ("Started", "Updated"):
            start_energy = energy if math.isfinite(energy) else 0.0
            ctx.resume_or_begin(tx_id, evse_id, _token(kw.get("id_token")), t, start_energy)
        elif event_type == "Ended":
            reason = str(transaction_info.get("stopped_reason") or "Local")
            ctx.stop_transaction(tx_id, t, energy, reason)
        return call_result.TransactionEvent(
            id_token_info={"status": AuthorizationStatusEnumType.accepted}
            if kw.get("id_token")
            else None
        )

    @after(Action.transaction_event)
    async def after_transaction_event(self, event_type: str, **kw: Any) -> None:
        evse = kw.get("evse")
        if event_type == "Started" and isinstance(evse, dict):
            await self.ctx.started(int(evse.get("id", 1)))

    def _profile_request(
        self, connector_id: int, tx_id: str, profile: dict[str, Any], schedule: dict[str, Any]
    ) -> Any:
        profile_id = PROFILE_ID_BASE + connector_id
        schedules = [{"id": profile_id, **schedule}]
        profile |= {"id": profile_id, "transaction_id": tx_id, "charging_schedule": schedules}
        return call.SetChargingProfile(evse_id=connector_id, charging_profile=profile)
