"""The background task that keeps the online series fresh (never part of the control cycle).

Each source is fetched every ``refresh_s`` on the daemon's clock; a failed fetch (a request
error, a time-out, a refused response) is retried after ``retry_s``, doubling per failure up
to ``refresh_s``. A failure is logged once when it starts (and again when its cause changes),
a recovery once. The forecaster keeps the last good series until it expires, then falls back
to its built-in source; nothing here can raise into the cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from essd.clock import Backoff, Clock, sleep_or_stop
from essd.forecast import OnlineSeries
from essd.online.sources import OnlineSource

if TYPE_CHECKING:
    from aiohttp import ClientSession

log = logging.getLogger(__name__)

#: Makes the HTTP session a source fetches through (tests point it at a local server).
SessionFactory = Callable[[float], "ClientSession"]


def default_session(timeout_s: float) -> ClientSession:
    """An aiohttp session with a total time-out per request."""
    import aiohttp  # noqa: PLC0415 - only when an online source is enabled

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How fresh one source is: times are epoch s (None: never)."""

    source: str
    last_success: float | None = None
    last_attempt: float | None = None
    failures: int = 0
    last_error: str | None = None
    covers_until: float | None = None


class OnlineForecasts:
    """Runs every enabled source's refresh loop; ``sink(quantity, series)`` receives each
    good series (the forecaster's ``set_online``)."""

    def __init__(
        self,
        sources: list[OnlineSource],
        sink: Callable[[str, OnlineSeries], None],
        *,
        clock: Clock,
        session_factory: SessionFactory = default_session,
    ) -> None:
        self.sources = sources
        self._sink = sink
        self._clock = clock
        self._session_factory = session_factory
        self.status: dict[str, SourceStatus] = {s.name: SourceStatus(s.name) for s in sources}

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every source until ``stop`` is set."""
        async with asyncio.TaskGroup() as tg:
            for source in self.sources:
                tg.create_task(self._loop(source, stop), name=f"online:{source.name}")

    async def _loop(self, source: OnlineSource, stop: asyncio.Event) -> None:
        try:
            await self._refresh_until(source, stop)
        except Exception:  # the session could not be made: this source is off, essd runs on
            log.exception("online forecast %s stopped; built-in forecasts in use", source.name)

    async def _refresh_until(self, source: OnlineSource, stop: asyncio.Event) -> None:
        cfg = source.config
        backoff = Backoff(initial_s=cfg.retry_s, max_s=max(cfg.refresh_s, cfg.retry_s))
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(self._session_factory(cfg.timeout_s))
            while not stop.is_set():
                ok = await self.refresh(source, session)
                failures = self.status[source.name].failures
                delay = cfg.refresh_s if ok else backoff.delay_s(failures)
                await sleep_or_stop(self._clock, delay, stop)

    async def refresh(self, source: OnlineSource, session: ClientSession) -> bool:
        """One fetch of ``source``: hands its series to the sink; False when it failed."""
        now = self._clock.now()
        old = self.status[source.name]
        try:
            async with asyncio.timeout(source.config.timeout_s):
                series = await source.fetch(session, now)
            for quantity, s in series.items():
                self._sink(quantity, s)
        except Exception as exc:  # any failure of a library or a response: logged, retried
            error = _describe(source.name, exc)
            if old.failures == 0 or error != old.last_error:
                log.error(
                    "online forecast %s failed (the last good or built-in forecast "
                    "stays in use): %s",
                    source.name,
                    error,
                )
            self.status[source.name] = SourceStatus(
                source.name,
                last_success=old.last_success,
                last_attempt=now,
                failures=old.failures + 1,
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
            "-" if until is None else _iso(until),
        )
        self.status[source.name] = SourceStatus(
            source.name, last_success=now, last_attempt=now, covers_until=until
        )
        return True


def _describe(name: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"{name}: no answer in time"
    text = str(exc) or type(exc).__name__
    return text if text.startswith(f"{name}:") else f"{name}: {type(exc).__name__}: {text}"


def _iso(t: float) -> str:
    from datetime import UTC, datetime  # noqa: PLC0415

    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="minutes")
