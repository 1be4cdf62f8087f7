"""Message routing that answers every bad message with OCPP's own error and never raises.

The ``ocpp`` library answers unknown actions (NotImplemented / NotSupported), schema
violations (FormatViolation, TypeConstraintViolation, ...) and handler exceptions
(InternalError) with a CALLERROR, but it drops a frame it cannot unpack (not JSON, not a list,
a bad message type) with only a log line, and queues responses nobody waits for. Here such a
frame gets a CALLERROR too (message id ``"-1"`` when none can be read, as OCPP-J 2.0.1 asks;
OCPP 1.6J's code for unparseable JSON is spelled ``FormationViolation``), unsolicited
responses are dropped, and nothing a charger sends can raise out of the connection's loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ocpp.exceptions import (
    InternalError,
    OCPPError,
    PropertyConstraintViolationError,
    ProtocolError,
)
from ocpp.messages import Call, CallError, MessageType, unpack

log = logging.getLogger("essd.ocpp")


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
