"""The OCPP central system: a WebSocket server (``websockets``) the site's chargers connect to,
speaking OCPP 1.6J or 2.0.1 (the ``ocpp`` library) as each charger's subprotocol asks.

- Loopback by default; TLS (wss://) when a certificate is configured; HTTP basic auth per
  charger (OCPP security profiles 1 and 2: the user name is the charger's identity).
- Chargers not configured are refused at the handshake unless ``allow_unknown_chargers``.
- One record per charger survives reconnects: a charger that drops its connection mid-session
  comes back to the same transactions, and a newer connection replaces an older one.
- Nothing a charger sends can stop the server: every connection runs in its own error
  boundary, every bad frame is answered with an OCPP error (:mod:`essd.ocpp.common`).
- It implements :class:`essd.flexloads.ChargerPort`: ``plugged()`` for the cycle, ``apply()``
  sends TxProfiles in the background, at most one request in flight per connector.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

import ocpp.messages
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from essd.clock import Clock
from essd.config_ev import ChargerConfig, OcppConfig, connector_key
from essd.flexloads import PluggedVehicle
from essd.ocpp.common import ChargerContext, LimitResult
from essd.ocpp.registry import ChargerInfo, ChargerRecord
from essd.ocpp.v16 import V16Charger
from essd.ocpp.v201 import V201Charger

log = logging.getLogger("essd.ocpp")


# Schema validation on the event loop (well under a millisecond a message) instead of the
# library's default thread pool: a connection's messages are then handled strictly in order
# (a charger's answer never overtakes the profile essd sent it first).
ocpp.messages.ASYNC_VALIDATION = False


Handler = V16Charger | V201Charger


def extract_charge_point_id(path: str | None) -> str | None:
    """The charge point identity: the last segment of the URL path (OCPP-J), decoded."""
    if not path:
        return None
    segment = unquote(urlsplit(path).path.rstrip("/").rpartition("/")[2])
    return segment or None


def _split_key(key: str) -> tuple[str, int]:
    head, sep, tail = key.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail)
    return key, 1


class CentralSystem:
    """The local OCPP central system; use as ``async with CentralSystem(...) as cs``."""

    def __init__(
        self, config: OcppConfig, chargers: Sequence[ChargerConfig], *, clock: Clock
    ) -> None:
        self.config = config
        self._configs = {c.id: c for c in chargers}
        self._clock = clock
        self._records: dict[str, ChargerRecord] = {}
        self._links: dict[str, Handler] = {}
        self._sending: dict[tuple[str, int], asyncio.Task[LimitResult]] = {}
        self._server: Server | None = None
        self.last_results: dict[str, LimitResult] = {}

    async def __aenter__(self) -> CentralSystem:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen for chargers."""
        ssl_context = None
        if self.config.cert_file is not None and self.config.key_file is not None:
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(self.config.cert_file, self.config.key_file)
        self._server = await serve(
            self._on_connect,
            self.config.host,
            self.config.port,
            subprotocols=list(self.config.protocols),  # type: ignore[arg-type]
            process_request=self._check_request,
            ssl=ssl_context,
        )

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        for task in self._sending.values():
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        """The port listened on (the actual one when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the central system is not running")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    def _charger_config(self, charger_id: str) -> ChargerConfig | None:
        config = self._configs.get(charger_id)
        if config is None and self.config.allow_unknown_chargers:
            config = ChargerConfig(id=charger_id)
        return config

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse unknown chargers (404) and wrong credentials (401) at the handshake."""
        charger_id = extract_charge_point_id(request.path)
        config = self._charger_config(charger_id) if charger_id else None
        if config is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown charge point\n")
        if config.password is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        try:
            user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        expected = config.password.get_secret_value()
        if (
            scheme.lower() == "basic"
            and user == charger_id
            and hmac.compare_digest(password.encode(), expected.encode())
        ):
            return None
        response = connection.respond(HTTPStatus.UNAUTHORIZED, "authentication required\n")
        response.headers["WWW-Authenticate"] = 'Basic realm="essd OCPP", charset="UTF-8"'
        return response

    async def _on_connect(self, ws: ServerConnection) -> None:
        request = ws.request
        charger_id = extract_charge_point_id(request.path) if request is not None else None
        config = self._charger_config(charger_id) if charger_id else None
        if config is None or charger_id is None or ws.subprotocol is None:
            # No OCPP subprotocol in common: OCPP-J says close the connection.
            await ws.close(code=1002, reason="no OCPP subprotocol in common")
            return
        record = self._records.setdefault(charger_id, ChargerRecord(charger_id))
        ctx = ChargerContext(
            record, config, self._clock, self.config.heartbeat_interval_s, self._started
        )
        cls = V16Charger if ws.subprotocol == "ocpp1.6" else V201Charger
        handler: Handler = cls(ctx, ws, response_timeout_s=self.config.response_timeout_s)
        old = self._links.get(charger_id)
        if old is not None:
            log.info("%s: reconnected; closing the older connection", charger_id)
            await old._connection.close(code=1000, reason="replaced by a newer connection")
        self._links[charger_id] = handler
        record.connected, record.protocol = True, str(ws.subprotocol)
        log.info("%s: connected (%s)", charger_id, ws.subprotocol)
        try:
            await handler.start()
        except ConnectionClosed:
            pass
        except Exception:  # a charger must never take the central system down
            log.exception("%s: connection failed", charger_id)
        finally:
            if self._links.get(charger_id) is handler:
                del self._links[charger_id]
                record.connected = False
                log.info("%s: disconnected", charger_id)

    async def _started(self, charger_id: int | str, connector_id: int) -> None:
        """A transaction started: hold it at the charger's ``initial_limit_w`` until the next
        cycle plans it (a car plugged in must not draw the charger's full default meanwhile)."""
        config = self._charger_config(str(charger_id))
        if config is not None and config.initial_limit_w is not None:
            task = asyncio.create_task(
                self.set_limit(str(charger_id), connector_id, config.initial_limit_w),
                name=f"ocpp-initial-limit-{charger_id}",
            )
            self._sending[(str(charger_id), connector_id)] = task
            await task

    def chargers(self) -> dict[str, ChargerInfo]:
        """A frozen view of every charger seen so far."""
        return {cid: rec.view() for cid, rec in self._records.items()}

    async def set_limit(self, charger_id: str, connector_id: int, limit_w: float) -> LimitResult:
        """Send one TxProfile now and wait for the answer (never raises)."""
        handler = self._links.get(charger_id)
        if handler is None:
            result = LimitResult(charger_id, connector_id, limit_w, False, "not connected")
        else:
            try:
                result = await handler.set_limit(
                    connector_id, limit_w, self.config.profile_validity_s
                )
            except Exception as exc:  # timeouts, CALLERRORs, a connection closing mid-call
                result = LimitResult(charger_id, connector_id, limit_w, False, type(exc).__name__)
                handler.ctx.record.rejected_profiles += 1
        self.last_results[connector_key(charger_id, connector_id)] = result
        return result

    # essd.flexloads.ChargerPort

    def plugged(self) -> list[PluggedVehicle]:
        """Connectors with a running transaction, with what they delivered so far."""
        out = []
        for cid, rec in self._records.items():
            config = self._charger_config(cid)
            if config is None:
                continue
            for tx in rec.transactions.values():
                if tx.stopped_at is not None:
                    continue
                meter = rec.meter.get(tx.connector_id)
                delivered = 0.0
                soc = power = math.nan
                if meter is not None:
                    if math.isfinite(meter.energy_wh):
                        delivered = max(meter.energy_wh - tx.meter_start_wh, 0.0)
                    soc, power = meter.soc, meter.power_w
                out.append(
                    PluggedVehicle(
                        charger_id=connector_key(cid, tx.connector_id),
                        session_id=tx.transaction_id,
                        plugged_at=tx.started_at,
                        delivered_wh=delivered,
                        max_power_w=config.max_power_w,
                        min_power_w=config.min_power_w,
                        # OCPP 1.6J / 2.0.1 TxProfiles limit charging only: no V2G here.
                        max_discharge_w=0.0,
                        soc=soc,
                        power_w=power,
                        default_energy_wh=config.default_energy_wh,
                        default_dwell_s=config.default_dwell_s,
                    )
                )
        return out

    def apply(self, limits_w: Mapping[str, float], *, valid_s: float) -> None:
        """Send each limit in the background (skipped while the last one is still in flight)."""
        del valid_s  # the configured validity applies; renewing every cycle keeps it alive
        for key, limit in limits_w.items():
            charger_id, connector_id = _split_key(key)
            slot = (charger_id, connector_id)
            running = self._sending.get(slot)
            if running is not None and not running.done():
                continue
            self._sending[slot] = asyncio.create_task(
                self.set_limit(charger_id, connector_id, limit), name=f"ocpp-limit-{key}"
            )

    async def drain(self) -> None:
        """Wait for the limits in flight (tests, shutdown)."""
        pending: list[Any] = [t for t in self._sending.values() if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
