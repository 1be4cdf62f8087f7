"""The daemon: builds the site from the configuration and runs control cycles until stopped.

Lifecycle: STARTING -> (durable state read) -> (first completed cycle) READY=1 / ONLINE ->
cycles every period -> a stop signal -> STOPPING=1, safe mode written to every storage unit
within 5 s, state saved, OFFLINE. The watchdog is fed from a separate task at half of
``WATCHDOG_USEC``, and only while cycles keep completing: a stuck cycle loop stops the pings
and systemd restarts essd.

Signals: SIGTERM and SIGINT stop essd (exit 0). Every other signal whose default is to end
the process and that can be caught (SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM) also leads to
the safe stop, and the exit status is 128 + the signal number, so systemd's
``Restart=on-failure`` starts essd again: essd reloads nothing on SIGHUP.

Time: cycles are scheduled on the clock's monotonic time only. A step of the wall clock (NTP,
an operator, a battery-less RTC) is detected and logged once by the controller; it never
stalls control and never adds to the totals or the billing peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from drivers.factory import EndpointPool
from drivers.profile_loader import resolve_profile
from essd.clock import Clock, RealClock, sleep_or_stop
from essd.config import Settings
from essd.config_loading import ConfigError
from essd.cycle import Controller
from essd.devices import ManagedDevice, envelope_for
from essd.domain import DeviceClass
from essd.endpoints import build_driver
from essd.events import DaemonStatus, DaemonStatusChanged, EventBus
from essd.flexloads import FlexLoads
from essd.forecast import Forecaster
from essd.metrics import MetricsExporter, MetricsServer
from essd.mqtt import open_bridge
from essd.ocpp import CentralSystem
from essd.online import OnlineForecasts, sources_for
from essd.online.runner import SessionFactory, default_session
from essd.sdnotify import SystemdNotifier
from essd.sitecheck import validate_site
from essd.state import StateStore, resolve_state_directory
from essd.swapsite import swap_station

log = logging.getLogger(__name__)


def settle_heap() -> None:
    """Take what start-up built out of the cyclic garbage collector's generations.

    Configuration, profiles, drivers, the compiled dispatch model and its HiGHS instance live
    as long as the process; every full collection would walk them again (measured at 100 units:
    85-105 ms per collection, one in eight cycles). After a collection, the live objects are
    frozen (:func:`gc.freeze`), so a full collection walks only what came after: 1-5 ms.
    Called once, after the first cycle completes (the first solve builds the solver's state).
    """
    gc.collect()
    gc.freeze()


SAFE_STOP_TIMEOUT_S = 5.0
#: Signals that stop essd cleanly with exit status 0.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Other catchable signals whose default would end the process: safe stop, exit 128 + signo.
FATAL_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def build_controller(
    settings: Settings, *, clock: Clock, bus: EventBus, pool: EndpointPool
) -> Controller:
    """Drivers, devices, forecaster and optimizer for ``settings`` (no I/O yet).

    Refuses (ConfigError) exactly what ``essd check-config`` refuses, and logs its warnings
    once each (a device that cannot be refreshed in time, or that never reverts by itself).
    """
    check = validate_site(settings)
    if check.problems:
        raise ConfigError(list(check.problems))
    for warning in check.warnings:
        log.warning("%s", warning)
    ctl = settings.control
    stale_after = ctl.stale_after_s or 3 * ctl.cycle_period_s
    devices = []
    for cfg in settings.devices:
        if not cfg.enabled:
            continue
        profile = resolve_profile(cfg.profile, settings.profile_dirs)  # cached by the check
        driver = build_driver(cfg, profile, clock=clock, pool=pool)
        envelope = (
            None
            if profile.device_class is DeviceClass.METER
            else envelope_for(
                cfg,
                profile,
                reserve_soc=ctl.reserve_soc,
                max_soc=ctl.max_soc,
                ramp=ctl.ramp_w_per_s,
            )
        )
        devices.append(
            ManagedDevice(
                config=cfg,
                profile=profile,
                driver=driver,
                envelope=envelope,
                clock=clock,
                bus=bus,
                ttl_s=ctl.setpoint_ttl_s,
                stale_after_s=stale_after,
            )
        )
    forecaster = Forecaster(settings.forecast, settings.tariff, settings.site.timezone)
    flex = None
    if settings.ocpp is not None:
        # EV chargers connect to essd's OCPP central system (started with the services).
        central = CentralSystem(settings.ocpp, settings.chargers, clock=clock)
        flex = FlexLoads(
            central,
            [key for c in settings.chargers for key in c.connector_ids],
            import_limit_w=settings.site.grid_import_limit_w,
            profile_validity_s=settings.ocpp.profile_validity_s,
        )
    if settings.swap_station is not None:
        flex = swap_station(settings, devices)
    return Controller(
        settings=settings, devices=devices, forecaster=forecaster, clock=clock, bus=bus, flex=flex
    )


@dataclass
class Daemon:
    """One essd instance. ``run()`` returns the process exit code."""

    settings: Settings
    clock: Clock = field(default_factory=RealClock)
    bus: EventBus = field(default_factory=EventBus)
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier.from_environment)
    serve_metrics: bool = True
    metrics_port: int | None = None
    controller: Controller | None = None
    _last_good_cycle_real: float | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    on_started: Callable[[Daemon], None] | None = None
    metrics_url: str | None = None
    state_store: StateStore | None = None
    exit_code: int = 0
    online: OnlineForecasts | None = None
    #: Makes the HTTP sessions of the online forecast sources (tests: a local server).
    online_sessions: SessionFactory = default_session

    def request_stop(self, signum: int | None = None) -> None:
        """Ask the daemon to stop after the current cycle (signal-safe).

        ``signum``: the signal that asked, if any; a signal other than SIGTERM/SIGINT makes
        the exit status 128 + signum (an unplanned stop that systemd restarts).
        """
        if signum is not None and signum not in STOP_SIGNALS:
            if not self._stop.is_set():
                log.warning(
                    "%s: stopping safely (exit %d); essd reloads nothing on signals",
                    signal.Signals(signum).name,
                    128 + signum,
                )
            self.exit_code = 128 + signum
        self._stop.set()

    def _open_state(self, controller: Controller) -> None:
        """Read the durable state into ``controller``; an unusable file is set aside."""
        cfg = self.settings.state
        directory = resolve_state_directory(cfg.directory, os.environ) if cfg.enabled else None
        if directory is None:
            if cfg.enabled:
                log.info(
                    "no state directory (state.directory or $STATE_DIRECTORY): totals, the "
                    "billing peak and learned forecasts are kept in memory only"
                )
            return
        store = StateStore(
            directory, site_id=self.settings.site.id, save_interval_s=cfg.save_interval_s
        )
        self.state_store = store
        data = store.load()
        if data is None:
            return
        try:
            controller.restore(data)
        except ValueError as exc:
            store.set_aside(f"{store.path}: {exc}")
            return
        log.info("state restored from %s (mode %s)", store.path, controller.mode)

    async def _save_state(self, controller: Controller, *, force: bool = False) -> None:
        store = self.state_store
        mono = self.clock.monotonic()
        if store is None or not (force or store.due(mono)):
            return
        data = controller.durable_state()
        saved_at = self.clock.now()
        # Off the event loop: an fsync can take a while on an SD card.
        await asyncio.to_thread(store.save, data, now_mono=mono, saved_at=saved_at)

    async def run(self, *, duration_s: float | None = None) -> int:
        """Run until stopped (or ``duration_s`` of clock time); returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (*STOP_SIGNALS, *FATAL_SIGNALS):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop, int(sig))
        self.bus.publish(DaemonStatusChanged(DaemonStatus.STARTING, self.clock.now()))
        sources = sources_for(self.settings)  # none unless enabled; ConfigError on a bad key
        pool = EndpointPool(clock=self.clock)
        controller = build_controller(self.settings, clock=self.clock, bus=self.bus, pool=pool)
        self.controller = controller
        if sources:
            self.online = OnlineForecasts(
                sources,
                controller.forecaster.set_online,
                clock=self.clock,
                session_factory=self.online_sessions,
                bus=self.bus,
            )
        self._open_state(controller)
        try:
            async with self._services(controller), asyncio.TaskGroup() as tg:
                tg.create_task(self._watchdog(), name="watchdog")
                if self.on_started is not None:
                    self.on_started(self)
                await self._cycles(controller, duration_s)
                self._stop.set()
        finally:
            self.notifier.stopping("writing safe mode to every device")
            self.bus.publish(DaemonStatusChanged(DaemonStatus.STOPPING, self.clock.now()))
            results = await controller.safe_stop(SAFE_STOP_TIMEOUT_S)
            failed = sorted(d for d, ok in results.items() if not ok)
            if failed:
                log.warning("safe mode not acknowledged by: %s", ", ".join(failed))
            await self._save_state(controller, force=True)
            if self.online is not None:
                await self.online.aclose()
            self.bus.publish(DaemonStatusChanged(DaemonStatus.OFFLINE, self.clock.now()))
            await pool.close()
            for sig in (*STOP_SIGNALS, *FATAL_SIGNALS):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        return self.exit_code

    @contextlib.asynccontextmanager
    async def _services(self, controller: Controller) -> AsyncIterator[None]:
        """Metrics endpoint and MQTT bridge for the lifetime of the run."""
        async with contextlib.AsyncExitStack() as stack:
            if self.serve_metrics and self.settings.metrics.enabled:
                exporter = MetricsExporter.from_settings(self.settings, clock=self.clock)
                stack.callback(exporter.attach(self.bus))
                config = self.settings.metrics
                if self.metrics_port is not None:
                    config = config.model_copy(update={"port": self.metrics_port})
                server = MetricsServer.from_config(exporter.exposition_cache, config)
                await stack.enter_async_context(server)
                self.metrics_url = server.url
            await stack.enter_async_context(
                open_bridge(self.settings, self.bus, controller, self.clock)
            )
            if controller.flex is not None and isinstance(controller.flex.port, CentralSystem):
                await stack.enter_async_context(controller.flex.port)
            yield

    async def _cycles(self, controller: Controller, duration_s: float | None) -> None:
        """Run cycles every period on the monotonic clock until stopped."""
        period = self.settings.control.cycle_period_s
        start = self.clock.monotonic()
        next_tick = start
        ready = False
        while not self._stop.is_set():
            try:
                event = await controller.run_cycle()
            except Exception:
                log.exception("control cycle failed; devices revert on their own timers")
            else:
                self._last_good_cycle_real = time.monotonic()
                status = (
                    f"cycle {event.cycle}: rung {int(event.plan.rung)} "
                    f"({event.plan.reason}), grid {event.grid_power_w or 0:.0f} W"
                )
                if not ready:
                    ready = True
                    settle_heap()
                    self.notifier.ready(status)
                    self.bus.publish(DaemonStatusChanged(DaemonStatus.ONLINE, self.clock.now()))
                elif event.cycle % 6 == 0:
                    self.notifier.status(status)
                await self._save_state(controller)
            if self.online is not None:
                # Due fetches start as tasks of their own: the cycle reads the last good series.
                self.online.poll()
            if duration_s is not None and self.clock.monotonic() - start >= duration_s:
                return
            next_tick += period
            now = self.clock.monotonic()
            if now >= next_tick:  # overrun: skip to the next boundary, never stack cycles
                next_tick = now + period - ((now - start) % period)
            await sleep_or_stop(self.clock, next_tick - now, self._stop)

    async def _watchdog(self) -> None:
        """Feed the systemd watchdog while cycles keep completing (real time, as systemd)."""
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        real = RealClock()
        period_real = self.settings.control.cycle_period_s / self.clock.speed
        allowance = 2 * period_real + self.settings.control.solve_budget_s + 1.0
        while not self._stop.is_set():
            last = self._last_good_cycle_real
            if last is not None and time.monotonic() - last <= allowance:
                self.notifier.watchdog()
            await sleep_or_stop(real, interval, self._stop)
