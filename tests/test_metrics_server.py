"""The metrics endpoint: a cached exposition served by a bounded asyncio server.

Timeouts are set to fractions of a second so the tests run quickly; assertions are on
outcomes (bytes served, renders counted, connections closed, thread counts), never on time.
"""

from __future__ import annotations

import asyncio
import gzip
import resource
import threading
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from essd.clock import SimClock
from essd.config import MetricsConfig
from essd.events import EventBus
from essd.metrics import MetricsExporter, MetricsServer
from tests.support.prometheus import FakeSite

HOST = "127.0.0.1"
# Far beyond any deadline in these tests: only reached if the server never closes.
GUARD_S = 30.0
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"

Response = tuple[int, dict[str, str], bytes]


@pytest.fixture
def clock() -> SimClock:
    return SimClock(1_767_225_600.0)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def site(clock: SimClock) -> FakeSite:
    return FakeSite(clock, period_s=10.0, ttl_s=60.0)


@pytest.fixture
def exporter(clock: SimClock, bus: EventBus, site: FakeSite) -> MetricsExporter:
    """An exporter without process metrics (they change between two renders), fed 3 cycles."""
    x = MetricsExporter(clock=clock, site_id="demo", currency="CNY", process_metrics=False)
    x.attach(bus)
    for ev in site.startup_events():
        bus.publish(ev)
    for _ in range(3):
        bus.publish(site.next_event())
        clock.advance(0.25)
    return x


def limited(exporter: MetricsExporter, **limits: float) -> MetricsServer:
    """A server on a free port with short limits (overridable)."""
    config = MetricsConfig.model_validate(
        {"header_timeout_s": 0.2, "idle_timeout_s": 0.2, **limits}
    )
    # Port 0 (any free one) is no valid configuration, but the server takes it.
    return MetricsServer.from_config(
        exporter.exposition_cache, config.model_copy(update={"port": 0})
    )


@pytest.fixture
async def server(exporter: MetricsExporter) -> AsyncIterator[MetricsServer]:
    async with limited(exporter, header_timeout_s=5.0, idle_timeout_s=5.0) as srv:
        yield srv


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """One HTTP response from ``reader``: status, headers (lower-case names) and body
    (none when it answers a HEAD request)."""
    text = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = text.rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = b"" if head else await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split(" ")[1]), headers, body


async def get(
    port: int, path: str = "/metrics", headers: dict[str, str] | None = None, method: str = "GET"
) -> Response:
    """One request on a fresh connection (``Connection: close``)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        async with asyncio.timeout(GUARD_S):
            response = await read_response(reader, head=method == "HEAD")
            assert await reader.read() == b""  # the server closed after answering
    finally:
        writer.close()
    return response


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (the server's counters have no event to await)."""
    async with asyncio.timeout(GUARD_S):
        while not condition():  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.01)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Whatever the server sent before it closed the connection (b"" when nothing)."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


# ------------------------------------------------------------------------ the cached payload


async def test_a_scrape_serves_what_generate_latest_renders(
    exporter: MetricsExporter, server: MetricsServer
) -> None:
    status, headers, body = await get(server.port)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body == generate_latest(exporter.registry)
    assert b'essd_device_soc_ratio{device="pcs1"}' in body


async def test_gzip_and_openmetrics_are_negotiated_as_prometheus_client_does(
    exporter: MetricsExporter, server: MetricsServer
) -> None:
    _, headers, body = await get(server.port, headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == generate_latest(exporter.registry)
    _, headers, body = await get(server.port, headers={"Accept": OPENMETRICS})
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body == generate_openmetrics(exporter.registry)


async def test_scrapes_take_the_cached_bytes_and_the_registry_renders_once_per_cycle(
    exporter: MetricsExporter, server: MetricsServer, bus: EventBus, site: FakeSite
) -> None:
    cache = exporter.exposition_cache
    first = cache.payload()
    renders = cache.renders
    bodies = [(await get(server.port))[2] for _ in range(20)]
    assert cache.renders == renders
    assert all(b == first.body for b in bodies)
    assert cache.payload().body is first.body  # the same object, not a copy
    gzipped = cache.payload(accept_encoding="gzip").body
    assert cache.payload(accept_encoding="gzip").body is gzipped  # compressed once
    bus.publish(site.next_event())
    assert cache.payload().body is not first.body
    assert cache.renders == renders + 1


async def test_a_stalled_loop_still_shows_a_growing_age(
    exporter: MetricsExporter, server: MetricsServer, clock: SimClock
) -> None:
    def cycle_age(body: bytes) -> float:
        line = next(ln for ln in body.splitlines() if ln.startswith(b"essd_cycle_age_seconds "))
        return float(line.split()[1])

    before = cycle_age((await get(server.port))[2])
    clock.advance(0.5)  # within the payload's max age: the cached bytes
    assert cycle_age((await get(server.port))[2]) == before
    clock.advance(30.0)  # no cycle completed, but the payload is older than a second
    assert cycle_age((await get(server.port))[2]) == pytest.approx(before + 30.5)


async def test_index_and_unknown_paths_and_methods(server: MetricsServer) -> None:
    status, _, body = await get(server.port, "/")
    assert status == 200
    assert b"/metrics" in body
    assert (await get(server.port, "/favicon.ico"))[0] == 404
    assert (await get(server.port, method="POST"))[0] == 405
    status, headers, body = await get(server.port, method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) > 0


async def test_keep_alive_serves_several_requests_on_one_connection(
    exporter: MetricsExporter,
) -> None:
    async with limited(exporter) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        try:
            for _ in range(3):
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                async with asyncio.timeout(GUARD_S):
                    status, headers, body = await read_response(reader)
                assert status == 200
                assert headers["connection"] == "keep-alive"
                assert b"essd_build_info" in body
            assert srv.connections == 1
            # Then it idles: closed after idle_timeout_s.
            async with asyncio.timeout(GUARD_S):
                assert await closed_by_server(reader) == b""
        finally:
            writer.close()
        assert srv.timed_out_total == 1


# -------------------------------------------------------------------------------- the limits


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"this test needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_two_thousand_idle_connections_take_no_threads_and_are_all_closed(
    exporter: MetricsExporter,
) -> None:
    n = 2000
    _raise_fd_limit(2 * n + 256)
    async with limited(exporter, max_connections=64) as srv:
        threads = threading.active_count()
        clients = [await asyncio.open_connection(HOST, srv.port) for _ in range(n)]
        try:
            assert threading.active_count() == threads
            async with asyncio.timeout(GUARD_S):
                received = await asyncio.gather(*(closed_by_server(r) for r, _ in clients))
        finally:
            for _, writer in clients:
                writer.close()
        assert received == [b""] * n  # none got an answer: they never asked
        assert threading.active_count() == threads
        assert srv.peak_connections <= 64
        assert srv.refused_total > 0
        # Every connection was either refused at once or closed by the header timeout.
        assert srv.refused_total + srv.timed_out_total == n
        assert (await get(srv.port))[0] == 200
        assert srv.connections == 0


async def test_a_slowloris_header_is_cut_off(exporter: MetricsExporter) -> None:
    async with limited(exporter) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        closed = asyncio.create_task(closed_by_server(reader))
        trickle = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        sent = 0
        try:
            async with asyncio.timeout(GUARD_S):
                for byte in trickle:
                    if closed.done():
                        break
                    writer.write(bytes([byte]))
                    sent += 1
                    await asyncio.sleep(0.01)
                assert await closed == b""
        except ConnectionError:
            pass  # the write after the server's close was reset: cut off all the same
        finally:
            writer.close()
        assert sent < len(trickle)
        assert srv.timed_out_total == 1
        assert srv.connections == 0


async def test_over_cap_connections_are_refused_and_scrapes_succeed_once_idle_ones_close(
    exporter: MetricsExporter,
) -> None:
    async with limited(exporter, max_connections=4, header_timeout_s=1.0) as srv:
        idle = [await asyncio.open_connection(HOST, srv.port) for _ in range(4)]
        try:
            await until(lambda: srv.connections == 4)
            reader, writer = await asyncio.open_connection(HOST, srv.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(GUARD_S):
                assert await closed_by_server(reader) == b""  # refused: no answer
            writer.close()
            assert srv.refused_total == 1
            async with asyncio.timeout(GUARD_S):
                for r, _ in idle:
                    assert await closed_by_server(r) == b""
        finally:
            for _, w in idle:
                w.close()
        status, _, body = await get(srv.port)
        assert status == 200
        assert b"essd_build_info" in body
        assert srv.refused_total == 1


async def test_a_flood_of_scrapes_is_paced_and_every_scrape_is_answered(
    exporter: MetricsExporter,
) -> None:
    async with limited(exporter, max_scrapes_per_s=2.0, header_timeout_s=5.0) as srv:
        async with asyncio.timeout(GUARD_S):
            answers = await asyncio.gather(*(get(srv.port) for _ in range(3)))
        assert [status for status, _, _ in answers] == [200] * 3
        # They arrived together: the first is answered at once, the others wait their turn.
        assert srv.paced_total == 2


async def test_an_oversized_or_malformed_request_is_answered_and_closed(
    exporter: MetricsExporter,
) -> None:
    async with limited(exporter, max_request_bytes=1024, header_timeout_s=5.0) as srv:
        status, _, _ = await get(srv.port, headers={"X-Big": "a" * 4096})
        assert status == 431
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        writer.write(b"nonsense\r\n\r\n")
        async with asyncio.timeout(GUARD_S):
            status, headers, _ = await read_response(reader)
            assert await closed_by_server(reader) == b""
        writer.close()
        assert status == 400
        assert headers["connection"] == "close"


async def test_stop_closes_open_connections(exporter: MetricsExporter) -> None:
    srv = limited(exporter, header_timeout_s=60.0)
    await srv.start()
    reader, writer = await asyncio.open_connection(HOST, srv.port)
    await until(lambda: srv.connections == 1)
    async with asyncio.timeout(GUARD_S):
        await srv.stop()
        assert await closed_by_server(reader) == b""
    writer.close()
    assert not srv.running
    assert srv.timed_out_total == 0
