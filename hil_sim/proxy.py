"""A delaying TCP proxy in front of a simulated device's port.

Response delay is injected in the network, not in the request handler: a handler that sleeps
makes pymodbus answer late requests out of order with the wrong transaction id, which no real
device does. Here each chunk the device sends back is queued with the time it arrived and
written to the client ``delay_s`` real seconds later, in order; requests pass straight through.
The proxy can also cut every connection and stop or resume accepting, like the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

_CHUNK = 65_536


class DelayProxy:
    """Listen on ``host:port`` (0 = a free port) and forward to ``target_host:target_port``."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._target = (target_host, target_port)
        self._host = host
        self._port = port
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    async def start(self) -> None:
        """Start listening."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, reuse_address=True
            )
            self._port = int(self._server.sockets[0].getsockname()[1])

    async def refuse_connections(self) -> None:
        """Stop listening; open connections keep working."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def accept_connections(self) -> None:
        """Listen again on the same port."""
        await self.start()

    def drop_connections(self) -> int:
        """Cut every open connection (both sides); returns how many client sides were cut."""
        n = len(self._clients)
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        self._clients.clear()
        return n

    async def stop(self) -> None:
        """Stop listening, cut every connection, wait for the pumps to end."""
        await self.refuse_connections()
        self.drop_connections()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def __aenter__(self) -> DelayProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        self._clients.add(writer)
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._spawn(self._pump(reader, up_writer))
        self._spawn(self._collect(up_reader, queue, writer))
        self._spawn(self._deliver(queue, writer, up_writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Requests: straight through.
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    async def _collect(
        self,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        client: asyncio.StreamWriter,
    ) -> None:
        # Answers: stamped with their due time as they arrive, delivered in order by _deliver.
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait((loop.time() + self.delay_s, data))
        except OSError:
            pass
        finally:
            queue.put_nowait(None)
            del client

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    # Network latency is real time whatever the simulation clock does.
                    await asyncio.sleep(wait)
                client.write(data)
                await client.drain()
        except OSError:
            pass
        finally:
            client.transport.abort()
            upstream.transport.abort()
            self._writers.discard(client)
            self._writers.discard(upstream)
            self._clients.discard(client)
