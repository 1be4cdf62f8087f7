"""Stand-ins for the online forecast APIs: a real HTTPS server on 127.0.0.1 serving recorded
responses (tests/data/online/), and aiohttp sessions whose resolver sends the APIs' host names
there (and nowhere else), so the client libraries run unchanged against it.

The server's certificate is made for the real host names by a local test CA (trustme), and the
sessions trust that CA only: a request that would leave the machine fails to resolve.
"""

from __future__ import annotations

import copy
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

DATA = Path(__file__).resolve().parent.parent / "data" / "online"
NORDPOOL_HOST = "dataportal-api.nordpoolgroup.com"
FORECAST_SOLAR_HOST = "api.forecast.solar"
HOSTS = (NORDPOOL_HOST, FORECAST_SOLAR_HOST)


def recorded(name: str) -> dict[str, Any]:
    """A recorded response body from tests/data/online/."""
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


class LoopbackResolver(AbstractResolver):
    """Resolves the APIs' host names to the local server; any other name fails."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in HOSTS:
            raise OSError(f"{host}: not resolved in tests (loopback only)")
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self.port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        return None


@dataclass
class FakeApis:
    """The running server: what it serves and what it was asked."""

    port: int
    client_ssl: ssl.SSLContext
    # Nord Pool: delivery date (YYYY-MM-DD) -> body; other dates answer 204 (not published).
    nordpool_days: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Forecast.Solar: the estimate body, or (status, body) for an error.
    estimate: dict[str, Any] | None = None
    estimate_status: int = 200
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    # Each request may be answered by a hook instead (returns a response or None).
    hook: Callable[[web.Request], web.StreamResponse | None] | None = None

    def session(self, timeout_s: float = 10.0) -> aiohttp.ClientSession:
        """A session that reaches this server under the APIs' host names."""
        connector = aiohttp.TCPConnector(resolver=LoopbackResolver(self.port), ssl=self.client_ssl)
        return aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )


def _app(apis: FakeApis) -> web.Application:
    async def dayahead(request: web.Request) -> web.StreamResponse:
        apis.requests.append((request.path, dict(request.query)))
        if apis.hook is not None and (hooked := apis.hook(request)) is not None:
            return hooked
        body = apis.nordpool_days.get(request.query.get("date", ""))
        if body is None:
            return web.Response(status=204)
        body = copy.deepcopy(body)
        area = request.query.get("deliveryArea")
        if area not in body["deliveryAreas"] or request.query.get("currency") != body["currency"]:
            return web.Response(status=204)  # as the portal answers for what it has not got
        return web.json_response(body)

    async def estimate(request: web.Request) -> web.StreamResponse:
        apis.requests.append((request.path, dict(request.query)))
        if apis.hook is not None and (hooked := apis.hook(request)) is not None:
            return hooked
        if apis.estimate is None:
            return web.json_response({"message": "no forecast"}, status=404)
        headers = {"X-Ratelimit-Limit": "12", "X-Ratelimit-Period": "3600"}
        headers["X-Ratelimit-Remaining"] = "11"
        return web.json_response(apis.estimate, status=apis.estimate_status, headers=headers)

    app = web.Application()
    app.router.add_get("/api/DayAheadPrices", dayahead)
    app.router.add_get("/estimate/{tail:.*}", estimate)
    app.router.add_get("/{key}/estimate/{tail:.*}", estimate)
    return app


class serve_apis:  # noqa: N801 - used as a context manager, like contextlib's
    """``async with serve_apis() as apis``: the HTTPS server on a free loopback port."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeApis:
        ca = trustme.CA()
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*HOSTS).configure_cert(server_ssl)
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        apis = FakeApis(port=0, client_ssl=client_ssl)
        self._runner = web.AppRunner(_app(apis), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ssl)
        await site.start()
        server = site._server  # the bound port of port 0
        assert server is not None
        apis.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return apis

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
