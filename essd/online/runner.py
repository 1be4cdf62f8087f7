"""Keeps the online series fresh in the background, never inside the control cycle.

:meth:`OnlineForecasts.poll` (called by the daemon between cycles) starts a fetch task for
each source that is due and returns at once; the fetch runs on its own and hands what it got
to the forecaster. A source is due ``refresh_s`` after a good fetch, ``retry_s`` after a
failed one, doubling per further failure up to ``refresh_s`` (times on the daemon's monotonic
clock). Polling rather than a sleeping loop keeps one sleeper on the clock, so a stepped
simulated clock jumps only to the next cycle.

A failure (a request error, a time-out, a refused response) is logged once when it starts
and again when its cause changes, a recovery once. The forecaster keeps the last good series
until it expires, then falls back to its built-in source; nothing here raises into the cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from essd.clock import Backoff, Clock
from essd.events import EventBus, OnlineForecastStatus
from essd.forecast import OnlineSeries
from essd.online.sources import OnlineSource

if TYPE_CHECKING:
    from aiohttp import ClientSession

log = logging.getLogger(__name__)

#: Makes the HTTP session a source fetches through, given the time-out (tests point it at a
#: local server).
SessionFactory = Callable[[float], "ClientSession"]


def default_session(timeout_s: float) -> ClientSession:
    """An aiohttp session with a total time-out per request."""
    import aiohttp  # noqa: PLC0415 - only when an online source is enabled

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How fresh one source is: ``last_success`` and ``covers_until`` are epoch s (None:
    never); ``failures`` counts the failed fetches since the last good one."""

    source: str
    last_success: float | None = None
    last_attempt: float | None = None
    failures: int = 0
    last_error: str | None = None
    covers_until: float | None = None


class OnlineForecasts:
    """Fetches every enabled source when due; ``sink(quantity, series)`` receives each good
    series (the forecaster's ``set_online``)."""

    def __init__(
        self,
        sources: list[OnlineSource],
        sink: Callable[[str, OnlineSeries], None],
        *,
        clock: Clock,
        session_factory: SessionFactory = default_session,
        bus: EventBus | None = None,
    ) -> None:
        self.sources = sources
        self._bus = bus
        self._sink = sink
        self._clock = clock
        self._session_factory = session_factory
        self.status: dict[str, SourceStatus] = {s.name: SourceStatus(s.name) for s in sources}
        self._due: dict[str, float] = {s.name: -float("inf") for s in sources}
        self._tasks: dict[str, asyncio.Task[bool]] = {}
        self._sessions: dict[str, ClientSession] = {}

    def poll(self) -> None:
        """Start a background fetch for every source that is due and not already fetching."""
        mono = self._clock.monotonic()
        for source in self.sources:
            task = self._tasks.get(source.name)
            if (task is None or task.done()) and mono >= self._due[source.name]:
                self._tasks[source.name] = asyncio.create_task(
                    self.refresh(source), name=f"online:{source.name}"
                )

    async def settle(self) -> None:
        """Wait for the fetches under way (tests; a stop)."""
        running = [t for t in self._tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running)

    async def aclose(self) -> None:
        """Cancel the fetches under way and close the sessions."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    async def refresh(self, source: OnlineSource) -> bool:
        """One fetch of ``source``, its series handed to the sink; False when it failed."""
        ok = await self._refresh(source)
        st = self.status[source.name]
        if self._bus is not None:
            self._bus.publish(
                OnlineForecastStatus(
                    source=source.name,
                    ok=ok,
                    failures=st.failures,
                    last_success=st.last_success,
                    covers_until=st.covers_until,
                    time=self._clock.now(),
                )
            )
        return ok

    async def _refresh(self, source: OnlineSource) -> bool:
        cfg = source.config
        now, mono = self._clock.now(), self._clock.monotonic()
        old = self.status[source.name]
        try:
            session = self._sessions.get(source.name)
            if session is None:
                session = self._sessions[source.name] = self._session_factory(cfg.timeout_s)
            async with asyncio.timeout(cfg.timeout_s):
                series = await source.fetch(session, now)
            for quantity, s in series.items():
                self._sink(quantity, s)
        except Exception as exc:  # any failure of a library or a response: logged, retried
            error = _describe(source.name, exc)
            if old.failures == 0 or error != old.last_error:
                log.error(
                    "online forecast %s failed; the last good or the built-in forecast stays "
                    "in use: %s",
                    source.name,
                    error,
                )
            failures = old.failures + 1
            backoff = Backoff(initial_s=cfg.retry_s, max_s=max(cfg.refresh_s, cfg.retry_s))
            self._due[source.name] = mono + backoff.delay_s(failures)
            self.status[source.name] = SourceStatus(
                source.name,
                last_success=old.last_success,
                last_attempt=now,
                failures=failures,
                last_error=error,
                covers_until=old.covers_until,
            )
            return False
        until = max((s.end for s in series.values()), default=None)
        if old.failures:
            log.warning(
                "online forecast %s recovered after %d failed fetches", source.name, old.failures
            )
        log.info(
            "online forecast %s: %s up to %s",
            source.name,
            ", ".join(sorted(series)),
            "-" if until is None else datetime.fromtimestamp(until, tz=UTC).isoformat(),
        )
        self._due[source.name] = mono + cfg.refresh_s
        self.status[source.name] = SourceStatus(
            source.name, last_success=now, last_attempt=now, covers_until=until
        )
        return True


def _describe(name: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"{name}: no answer in time"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__  # pynordpool raises a bare NordPoolError from the real one
    if not str(exc) and cause is not None:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return text if text.startswith(f"{name}:") else f"{name}: {type(exc).__name__}: {text}"
