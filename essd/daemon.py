"""The daemon: builds the site from the configuration and runs control cycles until stopped.

Lifecycle: STARTING -> (first completed cycle) READY=1 / ONLINE -> cycles every period ->
SIGTERM/SIGINT -> STOPPING=1, safe mode written to every storage unit within 5 s, OFFLINE,
exit 0. The watchdog is fed from a separate task at half of ``WATCHDOG_USEC``, and only while
cycles keep completing: a stuck cycle loop stops the pings and systemd restarts essd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from drivers.factory import EndpointPool, build_driver
from drivers.profile import resolve_profile
from essd.clock import Clock, RealClock
from essd.config import Settings
from essd.cycle import Controller
from essd.devices import ManagedDevice, envelope_for, refresh_warning
from essd.domain import DeviceClass
from essd.events import DaemonStatus, DaemonStatusChanged, EventBus
from essd.forecast import Forecaster
from essd.metrics import MetricsExporter, MetricsServer
from essd.mqtt import open_bridge
from essd.sdnotify import SystemdNotifier

__all__ = ["Daemon", "build_controller"]

log = logging.getLogger(__name__)

SAFE_STOP_TIMEOUT_S = 5.0


def build_controller(
    settings: Settings, *, clock: Clock, bus: EventBus, pool: EndpointPool
) -> Controller:
    """Drivers, devices, forecaster and optimizer for ``settings`` (no I/O yet)."""
    ctl = settings.control
    stale_after = ctl.stale_after_s or 3 * ctl.cycle_period_s
    devices = []
    for cfg in settings.devices:
        if not cfg.enabled:
            continue
        profile = resolve_profile(cfg.profile, settings.profile_dirs)
        warning = refresh_warning(cfg, profile, ctl.cycle_period_s)
        if warning is not None:
            log.warning("%s", warning)
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
    return Controller(
        settings=settings, devices=devices, forecaster=forecaster, clock=clock, bus=bus
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

    def request_stop(self) -> None:
        """Ask the daemon to stop after the current cycle (signal-safe)."""
        self._stop.set()

    async def run(self, *, duration_s: float | None = None) -> int:
        """Run until stopped (or ``duration_s`` of clock time); returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        self.bus.publish(DaemonStatusChanged(DaemonStatus.STARTING, self.clock.now()))
        pool = EndpointPool(clock=self.clock)
        controller = build_controller(self.settings, clock=self.clock, bus=self.bus, pool=pool)
        self.controller = controller
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
            self.bus.publish(DaemonStatusChanged(DaemonStatus.OFFLINE, self.clock.now()))
            await pool.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        return 0

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
            yield

    async def _cycles(self, controller: Controller, duration_s: float | None) -> None:
        period = self.settings.control.cycle_period_s
        start = self.clock.now()
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
                    self.notifier.ready(status)
                    self.bus.publish(DaemonStatusChanged(DaemonStatus.ONLINE, self.clock.now()))
                elif event.cycle % 6 == 0:
                    self.notifier.status(status)
            if duration_s is not None and self.clock.now() - start >= duration_s:
                return
            next_tick += period
            now = self.clock.now()
            if now >= next_tick:  # overrun: skip to the next boundary, never stack cycles
                next_tick = now + period - ((now - start) % period)
            await self._sleep_or_stop(next_tick - now)

    async def _sleep_or_stop(self, seconds: float, clock: Clock | None = None) -> None:
        """Wait ``seconds`` on ``clock`` (the daemon's by default), or until asked to stop."""
        sleeper = asyncio.ensure_future((clock or self.clock).sleep(seconds))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, stopper):
                t.cancel()

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
            await self._sleep_or_stop(interval, real)
