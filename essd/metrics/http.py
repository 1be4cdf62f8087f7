"""The metrics HTTP endpoint: a cached exposition served by a bounded asyncio server.

Rendering the registry is the expensive part of a scrape (a 100-unit site renders about
330 KB in tens of milliseconds, holding the interpreter), so it happens at most once per
control cycle: :class:`ExpositionCache` keeps the rendered bytes (and a gzip copy, made when a
client first asks for one) and a scrape only picks them up. The registry is rendered again
when a cycle has completed since, or when the payload is older than ``max_age_s`` on the
daemon's clock, so the ages it carries keep growing while the control loop is stalled.

:class:`MetricsServer` answers on the daemon's event loop (``asyncio.start_server``), with no
thread per connection. It bounds what a client can hold: at most ``max_connections`` open
connections (the next ones are closed at once), a request head must arrive complete within
``header_timeout_s`` and fit in ``max_request_bytes``, a kept-alive connection may wait
``idle_timeout_s`` for its next request, and a response must be taken up within
``idle_timeout_s``. Answers to ``/metrics`` are paced to at most ``max_scrapes_per_s``, first
come first served: a flood of scrapes waits in line (each connection has one request in
flight, so the line is at most ``max_connections`` long) instead of taking the event loop from
the control cycle. These are network limits, so they run on real time (``asyncio.timeout``,
``asyncio.sleep``) and never on the daemon's clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, gzip_accepted
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.registry import Collector

from essd.clock import Clock, RealClock

if TYPE_CHECKING:
    from essd.config import MetricsConfig


log = logging.getLogger(__name__)

#: Formats (content types) rendered per payload generation beyond the plain text format, so
#: a client cycling through exotic Accept headers cannot make every scrape render.
MAX_FORMATS = 4
_GZIP_LEVEL = 6  # about as small as level 9 for this text, at a fraction of the time

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_MAX_REQUEST_BYTES = 8192
DEFAULT_MAX_SCRAPES_PER_S = 50.0

_INDEX = b"essd metrics exporter: scrape /metrics\n"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


class MetricsServerError(Exception):
    """The metrics endpoint could not be started; the message names the config field."""


@dataclass(frozen=True, slots=True)
class Payload:
    """One scrape's answer: the cached body (gzip-compressed when ``gzip``) and its type."""

    content_type: str
    body: bytes
    gzip: bool


class _Rendered:
    """One format's rendered bytes and, once asked for, their gzip copy."""

    __slots__ = ("body", "gzipped")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.gzipped: bytes | None = None


class ExpositionCache:
    """The registry rendered once and served to every scrape until it is stale.

    Stale means a control cycle completed since the render (:meth:`cycle_completed`) or the
    render is ``max_age_s`` old on ``clock``. Each format a client negotiates (plain text or
    OpenMetrics, as ``prometheus_client`` chooses from the Accept header) is rendered on first
    demand per generation; :attr:`renders` counts registry renders. Thread safe: renders are
    serialized, so concurrent scrapes of a stale payload render it once.
    """

    def __init__(self, registry: Collector, *, clock: Clock, max_age_s: float = 1.0) -> None:
        self.registry = registry
        self.clock = clock
        self.max_age_s = max_age_s
        self.renders = 0
        self._lock = threading.Lock()
        self._stale = True
        self._rendered_at = 0.0
        self._formats: dict[str, _Rendered] = {}

    def cycle_completed(self) -> None:
        """Mark the payload stale: the next scrape renders the registry again."""
        self._stale = True

    def payload(self, accept: str | None = None, accept_encoding: str | None = None) -> Payload:
        """The cached answer for a request with these Accept and Accept-Encoding headers."""
        encoder, content_type = choose_encoder(accept or "")
        with self._lock:
            now = self.clock.monotonic()
            if self._stale or not 0.0 <= now - self._rendered_at < self.max_age_s:
                # Cleared before rendering: a cycle completing during a render marks it again.
                self._stale = False
                self._rendered_at = now
                self._formats.clear()
            rendered = self._formats.get(content_type)
            if rendered is None:
                if len(self._formats) >= MAX_FORMATS and content_type != CONTENT_TYPE_PLAIN_0_0_4:
                    encoder, content_type = generate_text, CONTENT_TYPE_PLAIN_0_0_4
                rendered = self._formats.get(content_type)
                if rendered is None:
                    rendered = self._formats[content_type] = _Rendered(self._render(encoder))
            if not gzip_accepted(accept_encoding or ""):
                return Payload(content_type, rendered.body, gzip=False)
            if rendered.gzipped is None:
                rendered.gzipped = gzip.compress(rendered.body, _GZIP_LEVEL, mtime=0)
            return Payload(content_type, rendered.gzipped, gzip=True)

    def _render(self, encoder: Callable[[Collector], bytes]) -> bytes:
        self.renders += 1
        return encoder(self.registry)


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    keep_alive: bool


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse(head: bytes) -> _Request:
    """A request head (request line and headers, CRLF-terminated) -> its parts."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1].startswith(("/", "*")):
        raise _BadRequest(400)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400)
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # A body is never read (only GET is served): close after answering rather than parse it.
    has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
    keep_alive = not has_body and (
        "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    )
    return _Request(method, target.partition("?")[0], headers, keep_alive)


def _response_head(status: int, headers: list[tuple[str, str]], length: int, keep: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class MetricsServer:
    """The HTTP endpoint serving a cached exposition (``GET /metrics``) on an event loop.

    ``source`` is the exporter's :class:`ExpositionCache` (``exporter.exposition_cache``); a
    bare registry is wrapped in a cache refreshed at most once a second of real time.
    :meth:`start`/:meth:`stop` (or ``async with``) serve on the running loop; ``start_sync``/
    ``stop_sync`` run the same server on a loop in one background thread, for synchronous
    callers. ``port=0`` picks a free port (see :attr:`port`).
    """

    def __init__(
        self,
        source: CollectorRegistry | ExpositionCache,
        *,
        bind: str = "127.0.0.1",
        port: int = 9108,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_scrapes_per_s: float = DEFAULT_MAX_SCRAPES_PER_S,
    ) -> None:
        if isinstance(source, ExpositionCache):
            self.cache = source
        else:
            self.cache = ExpositionCache(source, clock=RealClock())
        self.bind = bind
        self._port = port
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_scrapes_per_s = max_scrapes_per_s
        #: Connections open now, the most open at once, and those closed for being over the cap.
        self.connections = 0
        self.peak_connections = 0
        self.refused_total = 0
        #: Connections closed because a request head or a response took too long.
        self.timed_out_total = 0
        #: Scrapes that waited for their turn under ``max_scrapes_per_s``.
        self.paced_total = 0
        self._next_slot = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._at_cap = False
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(
        cls, source: CollectorRegistry | ExpositionCache, config: MetricsConfig
    ) -> MetricsServer:
        """A server on ``metrics.bind`` / ``metrics.port`` with the configured limits."""
        return cls(
            source,
            bind=config.bind,
            port=config.port,
            max_connections=config.max_connections,
            header_timeout_s=config.header_timeout_s,
            idle_timeout_s=config.idle_timeout_s,
            max_request_bytes=config.max_request_bytes,
            max_scrapes_per_s=config.max_scrapes_per_s,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (the chosen one when started with port 0)."""
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    @property
    def url(self) -> str:
        """The scrape URL, e.g. ``http://127.0.0.1:9108/metrics``."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        """True between a successful start and stop."""
        return self._server is not None

    async def start(self) -> None:
        """Listen on the running loop; MetricsServerError naming the config fields if not."""
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._connected, self.bind, self._port, limit=self.max_request_bytes
            )
        except OSError as exc:
            raise MetricsServerError(
                f"metrics.bind/metrics.port: cannot listen on {self.bind}:{self._port}: "
                f"{exc.strerror or exc}"
            ) from None

    async def stop(self) -> None:
        """Stop listening, close every open connection and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def start_sync(self) -> None:
        """Serve on an event loop in one background thread (for synchronous callers)."""
        if self._thread is not None:
            return
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller, who raises it
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.close()

        thread = threading.Thread(target=serve, name="essd-metrics", daemon=True)
        thread.start()
        try:
            started.result()
        finally:
            if started.exception() is not None:
                thread.join()
        self._thread, self._thread_loop = thread, loop

    def stop_sync(self) -> None:
        """Stop the background-thread server started by :meth:`start_sync`."""
        thread, loop = self._thread, self._thread_loop
        self._thread = self._thread_loop = None
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------- connections

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            self.refused_total += 1
            if not self._at_cap:
                self._at_cap = True
                log.warning(
                    "metrics endpoint: %d connections open, closing new ones until one ends "
                    "(metrics.max_connections)",
                    self.connections,
                )
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # the stream server runs each connection in a task
        self._tasks.add(task)
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        # drain() then waits until every byte is handed to the kernel, so closing loses none
        # and a client that reads nothing holds no more than the socket buffer.
        writer.transport.set_write_buffer_limits(0)
        done = False
        try:
            await self._serve(reader, writer)
            done = True
        except TimeoutError:
            self.timed_out_total += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            # stop() cancels the connection: this is the top of its task and nothing awaits it
            # but stop(), and the stream server's done-callback would log a cancelled task.
            pass
        finally:
            if done:
                writer.close()
            else:
                writer.transport.abort()
            self.connections -= 1
            self._tasks.discard(task)
            if self._at_cap and self.connections < self.max_connections:
                self._at_cap = False
                log.info("metrics endpoint: accepting connections again")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        first = True
        while True:
            # A new connection has header_timeout_s for its whole first request head; a kept-
            # alive one may idle up to idle_timeout_s, then has header_timeout_s for the rest.
            wait = self.header_timeout_s if first else self.idle_timeout_s
            try:
                async with asyncio.timeout(wait) as deadline:
                    head = await reader.readexactly(1)
                    if not first:
                        deadline.reschedule(loop.time() + self.header_timeout_s)
                    head += await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # closed between requests or in the middle of one
            except asyncio.LimitOverrunError:
                await self._send(writer, 431, [], b"", keep=False)
                return
            first = False
            try:
                request = _parse(head)
            except _BadRequest as bad:
                await self._send(writer, bad.status, [], b"", keep=False)
                return
            keep = request.keep_alive
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                await self._send(writer, 405, [("Allow", "GET, HEAD, OPTIONS")], b"", keep=keep)
            elif request.method == "OPTIONS":
                await self._send(writer, 200, [("Allow", "GET, HEAD, OPTIONS")], b"", keep=keep)
            elif request.path == "/metrics":
                await self._pace()
                payload = self.cache.payload(
                    request.headers.get("accept"), request.headers.get("accept-encoding")
                )
                headers = [("Content-Type", payload.content_type)]
                if payload.gzip:
                    headers.append(("Content-Encoding", "gzip"))
                body = payload.body if request.method == "GET" else b""
                await self._send(writer, 200, headers, body, keep=keep, length=len(payload.body))
            elif request.path == "/":
                body = _INDEX if request.method == "GET" else b""
                ctype = [("Content-Type", "text/plain; charset=utf-8")]
                await self._send(writer, 200, ctype, body, keep=keep, length=len(_INDEX))
            else:
                await self._send(writer, 404, [], b"", keep=keep)
            if not keep:
                return

    async def _pace(self) -> None:
        """Wait for this scrape's turn: answers start at least 1/max_scrapes_per_s apart."""
        if self.max_scrapes_per_s <= 0:
            return
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.max_scrapes_per_s
        if slot > now:
            self.paced_total += 1
            await asyncio.sleep(slot - now)  # real time: this paces network clients

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        keep: bool,
        length: int | None = None,
    ) -> None:
        writer.write(_response_head(status, headers, len(body) if length is None else length, keep))
        if body:
            writer.write(body)
        # A client that does not take the response within the idle timeout loses it.
        async with asyncio.timeout(self.idle_timeout_s):
            await writer.drain()
