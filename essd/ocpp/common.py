"""What the 1.6 and 2.0.1 charger handlers share: the record they fill, the clock, limits in
the charger's unit, the TxProfile validity, and message routing that answers every bad frame
with an OCPP error (:class:`GuardedRouting`).

Units: power W, current A per phase, times epoch s (ISO 8601 UTC on the wire).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ocpp.exceptions import (
    InternalError,
    OCPPError,
    PropertyConstraintViolationError,
    ProtocolError,
)
from ocpp.messages import Call, CallError, MessageType, unpack

from essd.clock import Clock
from essd.config_ev import ChargerConfig
from essd.ocpp.registry import ChargerRecord, RateUnit, TransactionInfo

log = logging.getLogger("essd.ocpp")


# Profile ids essd uses: one per connector, so a new profile replaces the previous one.
PROFILE_ID_BASE = 3100

# The stack level of essd's TxProfile (above any default profile the charger carries).
STACK_LEVEL = 2


def iso(t: float) -> str:
    """Epoch seconds as an OCPP timestamp (UTC, seconds)."""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Outcome of one SetChargingProfile: accepted or not, and why not."""

    charger_id: str
    connector_id: int
    limit_w: float
    accepted: bool
    reason: str = ""


@dataclass(slots=True)
class ChargerContext:
    """The per-charger things a handler needs besides its connection."""

    record: ChargerRecord
    config: ChargerConfig
    clock: Clock
    heartbeat_interval_s: int
    # Called (charger id, connector) after a transaction started and its answer went out.
    on_started: Callable[[str, int], Awaitable[object]] | None = None

    async def started(self, connector_id: int) -> None:
        """A transaction started on ``connector_id``: let the central system limit it."""
        if self.on_started is not None:
            await self.on_started(self.record.id, connector_id)

    def new_transaction(self, connector_id: int, id_tag: str, t: float, meter_wh: float) -> str:
        """Record a started transaction and return its id (a charger's retry gets the same)."""
        running = self.record.active(connector_id)
        if running is not None and running.id_tag == id_tag:
            return running.transaction_id
        if running is not None:
            self.stop_transaction(running.transaction_id, t, math.nan, "superseded")
        tx_id = str(self.record.next_transaction)
        self.record.next_transaction += 1
        self.resume_or_begin(tx_id, connector_id, id_tag, t, meter_wh)
        return tx_id

    def resume_or_begin(
        self, tx_id: str, connector_id: int, id_tag: str, t: float, meter_wh: float
    ) -> None:
        """Record a transaction whose id the charger chose (2.0.1); a known id resumes."""
        if tx_id in self.record.transactions:
            return
        self.record.transactions[tx_id] = TransactionInfo(
            transaction_id=tx_id,
            connector_id=connector_id,
            id_tag=id_tag,
            started_at=t,
            meter_start_wh=meter_wh,
        )

    def stop_transaction(self, tx_id: str, t: float, meter_wh: float, reason: str) -> None:
        """Mark a transaction stopped (an unknown id is recorded as such, not an error)."""
        tx = self.record.transactions.get(tx_id)
        if tx is None:
            log.info("%s: stop of unknown transaction %s", self.record.id, tx_id)
            return
        if tx.stopped_at is not None:
            return
        self.record.transactions[tx_id] = replace(
            tx, stopped_at=t, meter_stop_wh=meter_wh, stop_reason=reason
        )
        self.record.applied_limit_w.pop(tx.connector_id, None)


def schedule_limit(config: ChargerConfig, limit_w: float) -> tuple[RateUnit, float, int]:
    """A power limit in the unit the charger declared: W, or A per phase over its phases.

    Amps are rounded down to 0.1 A so the limit is never above the power asked for.
    """
    limit_w = max(limit_w, 0.0)
    unit = RateUnit(config.rate_unit)
    if unit is RateUnit.WATTS:
        return unit, round(limit_w, 1), config.phases
    amps = limit_w / (config.voltage_v * config.phases)
    return unit, math.floor(amps * 10.0) / 10.0, config.phases


# Message routing that answers every bad message with OCPP's own error and never raises.
#
# The ``ocpp`` library answers unknown actions (NotImplemented / NotSupported), schema
# violations (FormatViolation, TypeConstraintViolation, ...) and handler exceptions
# (InternalError) with a CALLERROR, but it drops a frame it cannot unpack (not JSON, not a list,
# a bad message type) with only a log line, and queues responses nobody waits for. Here such a
# frame gets a CALLERROR too (message id ``"-1"`` when none can be read, as OCPP-J 2.0.1 asks;
# OCPP 1.6J's code for unparseable JSON is spelled ``FormationViolation``), unsolicited
# responses are dropped, and nothing a charger sends can raise out of the connection's loop.


def _message_id(raw: object) -> str:
    try:
        msg = json.loads(raw) if isinstance(raw, str | bytes) else None
    except (ValueError, UnicodeDecodeError):
        return "-1"
    if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str) and msg[1]:
        return msg[1]
    return "-1"


class GuardedRouting:
    """Mixin for an ``ocpp`` ChargePoint: put it first in the bases."""

    # Provided by the library's ChargePoint (annotations only: nothing here overrides them).
    _ocpp_version: str
    id: str
    _call_lock: asyncio.Lock
    _send: Callable[[str], Awaitable[None]]

    async def _reply_error(self, unique_id: str, exc: OCPPError) -> None:
        code = exc.code
        if code == "FormatViolation" and self._ocpp_version == "1.6":
            code = "FormationViolation"
        if (
            isinstance(exc, PropertyConstraintViolationError)
            and "MessageTypeId" in str(exc.details)
            and self._ocpp_version != "1.6"
        ):
            code = "MessageTypeNotSupported"  # OCPP-J 2.0.1's code for it
        error = CallError(
            unique_id=unique_id,
            error_code=code,
            error_description=str(exc.description),
            error_details=exc.details if isinstance(exc.details, dict) else {},
        )
        await self._send(error.to_json())

    async def route_message(self, raw_msg: Any) -> None:
        """Route one frame; a bad one is answered with a CALLERROR, nothing raises."""
        try:
            msg = unpack(raw_msg)
        except OCPPError as exc:
            await self._reply_error(_message_id(raw_msg), exc)
            return
        except Exception:  # unpack on non-text frames (bytes of another encoding, ...)
            await self._reply_error("-1", ProtocolError(details={"cause": "unreadable frame"}))
            return
        if msg.message_type_id == MessageType.Call:
            if not (
                isinstance(msg.unique_id, str)
                and isinstance(msg.action, str)
                and isinstance(msg.payload, dict)
            ):
                cause = "a CALL is [2, <id: string>, <action: string>, <payload: object>]"
                uid = msg.unique_id if isinstance(msg.unique_id, str) else "-1"
                await self._reply_error(uid, ProtocolError(details={"cause": cause}))
                return
        elif not self._call_lock.locked():
            log.info("%s: dropped a response to no pending request: %s", self.id, raw_msg)
            return
        try:
            await super().route_message(raw_msg)  # type: ignore[misc]
        except Exception:
            log.exception("%s: message handling failed: %s", self.id, raw_msg)
            if isinstance(msg, Call):
                await self._reply_error(msg.unique_id, InternalError())


class ChargerHandler(GuardedRouting):
    """What the 1.6 and 2.0.1 handlers share: the context, the clock and the TxProfile limit.

    Put it first in the bases, before the library's ChargePoint (which provides ``call``).
    """

    ctx: ChargerContext
    call: Callable[..., Awaitable[Any]]

    def _now(self) -> float:
        return self.ctx.clock.now()

    def _profile_request(
        self, connector_id: int, tx_id: str, profile: dict[str, Any], schedule: dict[str, Any]
    ) -> Any:
        """The version's SetChargingProfile request carrying ``profile`` and ``schedule``."""
        raise NotImplementedError

    async def set_limit(self, connector_id: int, limit_w: float, valid_s: float) -> LimitResult:
        """Send a TxProfile limiting the running transaction of ``connector_id`` (the EVSE
        id in 2.0.1) to ``limit_w``, valid for ``valid_s``."""
        rec = self.ctx.record
        tx = rec.active(connector_id)
        if tx is None:
            return LimitResult(rec.id, connector_id, limit_w, False, "no transaction")
        now = self._now()
        unit, limit, phases = schedule_limit(self.ctx.config, limit_w)
        profile = {
            "stack_level": STACK_LEVEL,
            "charging_profile_purpose": "TxProfile",
            "charging_profile_kind": "Absolute",
            "valid_from": iso(now),
            "valid_to": iso(now + valid_s),
        }
        schedule = {
            "start_schedule": iso(now),
            "duration": math.ceil(valid_s),
            "charging_rate_unit": unit.value,
            "charging_schedule_period": [
                {"start_period": 0, "limit": limit, "number_phases": phases}
            ],
        }
        request = self._profile_request(connector_id, tx.transaction_id, profile, schedule)
        response = await self.call(request, suppress=False)
        if response.status == "Accepted":
            rec.applied_limit_w[connector_id] = limit_w
            return LimitResult(rec.id, connector_id, limit_w, True)
        rec.rejected_profiles += 1
        return LimitResult(rec.id, connector_id, limit_w, False, str(response.status))
