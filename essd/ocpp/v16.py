"""OCPP 1.6J: the central system's handler for one connected charge point.

Reads: BootNotification, Heartbeat, StatusNotification, MeterValues, Start/StopTransaction,
Authorize (accepted: authorization is the charger's or the site's business, not essd's).
Controls: SetChargingProfile with a TxProfile per running transaction, its limit in the unit the
charger declared, ``validTo`` = now + the profile validity, so a charger whose central system
stops renewing falls back to its default limit.
"""

from __future__ import annotations

from typing import Any

from ocpp.routing import after, on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, AuthorizationStatus, RegistrationStatus

from essd.ocpp.common import PROFILE_ID_BASE, ChargerContext, ChargerHandler, iso
from essd.ocpp.registry import ConnectorInfo, parse_meter_values, parse_time


class V16Charger(ChargerHandler, ChargePoint):
    """One OCPP 1.6J charge point connected to essd."""

    def __init__(self, ctx: ChargerContext, connection: Any, *, response_timeout_s: float) -> None:
        super().__init__(ctx.record.id, connection, response_timeout=response_timeout_s)
        self.ctx = ctx

    @on(Action.boot_notification)
    def on_boot_notification(
        self, charge_point_vendor: str, charge_point_model: str, **_: Any
    ) -> call_result.BootNotification:
        rec = self.ctx.record
        rec.vendor, rec.model = charge_point_vendor, charge_point_model
        return call_result.BootNotification(
            current_time=iso(self._now()),
            interval=self.ctx.heartbeat_interval_s,
            status=RegistrationStatus.accepted,
        )

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=iso(self._now()))

    @on(Action.status_notification)
    def on_status_notification(
        self, connector_id: int, error_code: str, status: str, **kw: Any
    ) -> call_result.StatusNotification:
        at = parse_time(kw.get("timestamp"), self._now())
        self.ctx.record.connectors[connector_id] = ConnectorInfo(status, error_code, at)
        return call_result.StatusNotification()

    @on(Action.meter_values)
    def on_meter_values(
        self, connector_id: int, meter_value: list[Any], **_: Any
    ) -> call_result.MeterValues:
        rec = self.ctx.record
        rec.meter[connector_id] = parse_meter_values(
            meter_value, self._now(), rec.meter.get(connector_id)
        )
        return call_result.MeterValues()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str, **_: Any) -> call_result.Authorize:
        return call_result.Authorize(id_tag_info={"status": AuthorizationStatus.accepted})

    @on(Action.start_transaction)
    def on_start_transaction(
        self, connector_id: int, id_tag: str, meter_start: int, timestamp: str, **_: Any
    ) -> call_result.StartTransaction:
        t = parse_time(timestamp, self._now())
        tx_id = self.ctx.new_transaction(connector_id, id_tag, t, float(meter_start))
        return call_result.StartTransaction(
            transaction_id=int(tx_id), id_tag_info={"status": AuthorizationStatus.accepted}
        )

    @after(Action.start_transaction)
    async def after_start_transaction(self, connector_id: int, **_: Any) -> None:
        await self.ctx.started(connector_id)

    @on(Action.stop_transaction)
    def on_stop_transaction(
        self, meter_stop: int, timestamp: str, transaction_id: int, **kw: Any
    ) -> call_result.StopTransaction:
        t = parse_time(timestamp, self._now())
        reason = str(kw.get("reason") or "Local")
        self.ctx.stop_transaction(str(transaction_id), t, float(meter_stop), reason)
        return call_result.StopTransaction(id_tag_info={"status": AuthorizationStatus.accepted})

    def _profile_request(
        self, connector_id: int, tx_id: str, profile: dict[str, Any], schedule: dict[str, Any]
    ) -> Any:
        profile |= {
            "charging_profile_id": PROFILE_ID_BASE + connector_id,
            "transaction_id": int(tx_id),
            "charging_schedule": schedule,
        }
        return call.SetChargingProfile(connector_id=connector_id, cs_charging_profiles=profile)
