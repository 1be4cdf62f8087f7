"""Run a whole simulated site: every device of an essd site config, served over real Modbus.

::

    async with SimulatedSite(settings, clock=SimClock(speed=600), free_ports=True) as sim:
        daemon_settings = sim.settings          # transports rewritten to the served ports
        truth = sim.truth()                     # SoC, power per device, grid power, violations

Devices that share a transport (host:port and framing, or a serial path) share one
:class:`hil_sim.modbus_server.ModbusServer`, one store per unit id, as units behind one gateway do.
Serial devices get a pty pair from ``socat``: the configured path is the daemon's end.
A device that has a ``delay`` fault on the timeline (or every TCP device with ``proxy=True``)
sits behind a :class:`hil_sim.proxy.DelayProxy` on its configured port.

Time is the injected clock's: a :class:`essd.clock.SimClock` running at 600x for CI, a stepped
one for tests that move time themselves, or the real clock for a bench. The devices integrate
lazily (whenever they are read or the truth is asked for); a small real-time ticker applies the
fault timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from drivers.layout import from_base
from drivers.modbus import Framing
from drivers.profile import Profile
from drivers.profile_loader import resolve_profile
from essd.clock import Clock
from essd.config import DeviceConfig, RtuOverTcpTransport, SerialTransport, Settings, TcpTransport
from essd.domain import DeviceClass
from hil_sim.devices import (
    MeterDevice,
    PortableDevice,
    SimDevice,
    StorageDevice,
    build_image,
    build_storage_device,
)
from hil_sim.faults import FaultError, FaultSpec, FaultTimeline, check_devices
from hil_sim.modbus_server import ModbusServer
from hil_sim.proxy import DelayProxy
from hil_sim.site import Site, SiteSeries, default_series_path
from hil_sim.store import ModbusExceptionCode
from hil_sim.truth import Limits, SiteTruth

log = logging.getLogger(__name__)

_TICK_S = 0.02  # real seconds between fault-timeline checks
# Faults that switch one flag of the device's DeviceFaults.
_FLAG_FAULTS = {
    "comm_loss": "no_answer",
    "meter_loss": "no_answer",
    "frozen_registers": "frozen",
    "ignored_writes": "ignore_writes",
    "safe_mode_ignored": "ignore_safe_mode",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a simulated device answers: ``url`` as the CLI prints it."""

    device_id: str
    profile: str
    kind: str  # tcp | rtu-over-tcp | serial
    host: str
    port: int
    path: str
    unit: int

    @property
    def url(self) -> str:
        """``modbus-tcp://host:port``, ``modbus-rtu-over-tcp://host:port`` or the serial path."""
        if self.kind == "serial":
            return self.path
        scheme = "modbus-tcp" if self.kind == "tcp" else "modbus-rtu-over-tcp"
        return f"{scheme}://{self.host}:{self.port}"

    def line(self) -> str:
        """``<device id> <profile> <url> unit=<id>``."""
        return f"{self.device_id} {self.profile} {self.url} unit={self.unit}"


@dataclass
class _Group:
    """Devices behind one transport: one server, maybe a proxy or a pty pair."""

    key: tuple[str, str, int | str]
    kind: str
    host: str
    port: int
    path: str
    framing: Framing
    stores: dict[int, SimDevice]
    server: ModbusServer | None = None
    proxy: DelayProxy | None = None
    socat: asyncio.subprocess.Process | None = None

    @property
    def public_port(self) -> int:
        """The port clients connect to (the proxy's when there is one)."""
        if self.proxy is not None:
            return self.proxy.port
        assert self.server is not None
        return self.server.port


def _group_key(
    t: TcpTransport | RtuOverTcpTransport | SerialTransport,
) -> tuple[str, str, int | str]:
    if isinstance(t, SerialTransport):
        return ("serial", "", t.port)
    return (t.kind, t.host, t.port)


class SimulatedSite:
    """Every enabled device of ``settings``, served on loopback, with physics and faults.

    ``free_ports``: serve on free ports (and rewrite :attr:`settings`) instead of the configured
    ones. ``series``: load/PV (default: :func:`~hil_sim.site.default_series_path`). ``faults``:
    the timeline, offsets from the start. ``initial_soc``: per device id. ``proxy``: put every
    TCP device behind a delaying proxy (otherwise only those with a delay fault).
    ``export_limiter``: the PV inverters curtail to the export limit (zero-export sites).
    ``source`` and ``faults_source`` name the site and fault files in error messages.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        series: SiteSeries | None = None,
        faults: Sequence[FaultSpec] = (),
        free_ports: bool = False,
        initial_soc: dict[str, float] | None = None,
        proxy: bool = False,
        export_limiter: bool = False,
        source: str = "site",
        faults_source: str = "faults",
    ) -> None:
        self._settings = settings
        self.clock = clock
        tz = ZoneInfo(settings.site.timezone)
        self.series = series or SiteSeries.load(default_series_path(settings, None), tz)
        self._faults = tuple(faults)
        self._free_ports = free_ports
        self._initial_soc = dict(initial_soc or {})
        self._proxy_all = proxy
        self._source = source
        self._faults_source = faults_source
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        limits = Limits(
            import_w=settings.site.grid_import_limit_w, export_w=settings.site.grid_export_limit_w
        )
        self.site = Site(
            clock=clock, series=self.series, export_limiter=export_limiter, limits=limits
        )
        self.devices: dict[str, SimDevice] = {}
        self.profiles: dict[str, Profile] = {}
        self._groups: dict[tuple[str, str, int | str], _Group] = {}
        self._group_of: dict[str, _Group] = {}
        self._timeline: FaultTimeline | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self._build()

    # -- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        classes: dict[str, str] = {}
        ctl = self._settings.control
        for dev in self._settings.devices:
            if not dev.enabled:
                continue
            profile = resolve_profile(dev.profile, self._settings.profile_dirs)
            self.profiles[dev.id] = profile
            classes[dev.id] = profile.device_class.value
            device = self._device(dev, profile)
            self.devices[dev.id] = device
            if isinstance(device, StorageDevice):
                self.site.add_storage(device)
                self.site.limits.reserve_soc[dev.id] = dev.reserve_soc or ctl.reserve_soc
                self.site.limits.max_soc[dev.id] = dev.max_soc or ctl.max_soc
            elif isinstance(device, MeterDevice):
                self.site.add_meter(device)
            key = _group_key(dev.transport)
            group = self._groups.get(key)
            if group is None:
                t = dev.transport
                group = _Group(
                    key=key,
                    kind=t.kind,
                    host="" if isinstance(t, SerialTransport) else t.host,
                    port=0 if isinstance(t, SerialTransport) else t.port,
                    path=t.port if isinstance(t, SerialTransport) else "",
                    framing=Framing.SOCKET if t.kind == "tcp" else Framing.RTU,
                    stores={},
                )
                self._groups[key] = group
            if dev.transport.unit in group.stores:
                raise ValueError(
                    f"{self._source}: devices: {dev.id} and another device share "
                    f"{dev.transport.kind} {key[1:]} unit {dev.transport.unit}"
                )
            group.stores[dev.transport.unit] = device
            self._group_of[dev.id] = group
        check_devices(self._faults, classes, self._faults_source)
        self._check_glitch_ranges()

    def _check_glitch_ranges(self) -> None:
        """A meter glitch reports a value its grid-power register can hold (else the driver
        would simply see an invalid reading, which is not the fault under test)."""
        problems = []
        for i, f in enumerate(self._faults):
            if f.kind != "meter_glitch" or f.value_w is None:
                continue
            profile = self.profiles[f.device]
            reg = profile.fields.get("grid_power_w")
            if reg is None:
                continue
            spec = profile.register(reg)
            value = from_base(f.value_w, spec.unit)
            if (spec.min is not None and value < spec.min) or (
                spec.max is not None and value > spec.max
            ):
                problems.append(
                    f"{self._faults_source}: faults.{i}.value_w: {f.value_w:g} W is outside "
                    f"the meter's register range [{spec.min}, {spec.max}] {spec.unit}"
                )
        if problems:
            raise FaultError("\n".join(problems))

    def _device(self, dev: DeviceConfig, profile: Profile) -> SimDevice:
        if profile.device_class is DeviceClass.METER:
            return MeterDevice(
                device_id=dev.id,
                profile=profile,
                image=build_image(profile, unit=dev.transport.unit),
                clock=self.clock,
                grid_power_w=self.site.grid_power_w,
            )
        return build_storage_device(
            device_id=dev.id,
            profile=profile,
            clock=self.clock,
            unit=dev.transport.unit,
            initial_soc=self._initial_soc.get(dev.id),
            capacity_wh=dev.capacity_wh,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve every device (OSError when a configured port is taken)."""
        delayed = {f.device for f in self._faults if f.kind == "delay"}
        try:
            await asyncio.gather(
                *(
                    self._start_group(g, delayed & {d.device_id for d in g.stores.values()})
                    for g in self._groups.values()
                )
            )
        except BaseException:
            await self.stop()
            raise
        self.started_at = self.clock.now()
        self._timeline = FaultTimeline(self._faults, self.started_at)
        self._apply_due()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="hil-sim-faults")

    async def _start_group(self, g: _Group, delayed: set[str]) -> None:
        stores = dict(g.stores)
        if g.kind == "serial":
            await self._start_serial(g, stores)
            return
        wants_proxy = self._proxy_all or bool(delayed)
        port = 0 if (self._free_ports or wants_proxy) else g.port
        g.server = ModbusServer.tcp(stores, host=g.host, port=port, framing=g.framing)
        await g.server.start()
        if wants_proxy:
            g.proxy = DelayProxy(
                g.host, g.server.port, host=g.host, port=0 if self._free_ports else g.port
            )
            await g.proxy.start()

    async def _start_serial(self, g: _Group, stores: dict[int, SimDevice]) -> None:
        socat = shutil.which("socat")
        if socat is None:
            raise OSError("socat is not installed: a serial device needs a pty pair")
        if self._free_ports or not g.path:
            if self._tmpdir is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="hil-sim-")
            g.path = str(Path(self._tmpdir.name) / f"tty{len(self._groups)}-{id(g) % 10000}")
        sim_end = g.path + ".sim"
        g.socat = await asyncio.create_subprocess_exec(
            socat,
            f"pty,raw,echo=0,link={g.path}",
            f"pty,raw,echo=0,link={sim_end}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):  # socat creates both links within a few milliseconds
            if _both_exist(g.path, sim_end):
                break
            await asyncio.sleep(0.005)
        else:
            raise OSError(f"socat did not create {g.path}")
        g.server = ModbusServer.serial(stores, path=sim_end)
        await g.server.start()

    async def stop(self) -> None:
        """Stop serving, stop the ticker, remove the pty pairs."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for g in self._groups.values():
            if g.proxy is not None:
                await g.proxy.stop()
            if g.server is not None:
                await g.server.stop()
            if g.socat is not None and g.socat.returncode is None:
                g.socat.terminate()
                with contextlib.suppress(ProcessLookupError):
                    await g.socat.wait()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> SimulatedSite:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _tick(self) -> None:
        while True:
            # Polled in real time: with a stepped clock the simulator must not move time itself.
            await asyncio.sleep(_TICK_S)
            try:
                self._apply_due()
            except Exception:
                log.exception("applying the fault timeline failed")

    def _apply_due(self) -> None:
        if self._timeline is None:
            return
        for tr in self._timeline.due(self.clock.now()):
            self.set_fault(tr.fault, active=tr.active, at=tr.time)

    # -- what tests and the scenario runner use ------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The site settings with every transport pointing at the served devices."""
        devices = []
        for dev in self._settings.devices:
            g = self._group_of.get(dev.id)
            if g is None or (g.server is None and g.socat is None):
                devices.append(dev)
                continue
            t = dev.transport
            if isinstance(t, SerialTransport):
                t = t.model_copy(update={"port": g.path})
            else:
                t = t.model_copy(update={"host": g.host, "port": g.public_port})
            devices.append(dev.model_copy(update={"transport": t}))
        return self._settings.model_copy(update={"devices": tuple(devices)})

    def endpoints(self) -> list[Endpoint]:
        """Where each device answers, in the order of the site config."""
        out = []
        for dev in self._settings.devices:
            g = self._group_of.get(dev.id)
            if g is None:
                continue
            port = 0 if g.kind == "serial" else g.public_port
            out.append(
                Endpoint(dev.id, dev.profile, g.kind, g.host, port, g.path, dev.transport.unit)
            )
        return out

    def truth(self) -> SiteTruth:
        """Advance to the clock's now and return the true state (and record violations)."""
        self._apply_due()
        return self.site.truth()

    def device(self, device_id: str) -> SimDevice:
        """A simulated device by id."""
        return self.devices[device_id]

    def storage(self, device_id: str) -> StorageDevice:
        """A simulated storage unit by id."""
        dev = self.devices[device_id]
        if not isinstance(dev, StorageDevice):
            raise TypeError(f"{device_id}: not a storage unit")
        return dev

    def server_of(self, device_id: str) -> ModbusServer:
        """The Modbus server a device is served by."""
        server = self._group_of[device_id].server
        assert server is not None
        return server

    def set_fault(self, fault: FaultSpec, active: bool, *, at: float | None = None) -> None:
        """Start or end one fault at ``at`` (default now; the timeline passes the time it was
        due, so the physics switches at the right instant even when time jumped past it)."""
        dev = self.devices[fault.device]
        g = self._group_of[fault.device]
        kind = fault.kind
        log.info("%s: fault %s %s", fault.device, kind, "starts" if active else "ends")
        dev.invalidate()
        flag = _FLAG_FAULTS.get(kind)
        if flag is not None:
            setattr(dev.faults, flag, active)
        elif kind in ("meter_glitch", "meter_drift"):
            self._set_meter_fault(dev, fault, active, self.clock.now() if at is None else at)
        elif kind == "exception_responses":
            dev.faults.exception_code = ModbusExceptionCode(fault.code) if active else None
        elif kind == "bms_fault":
            assert isinstance(dev, StorageDevice)
            dev.set_bms_fault(active, at=at)
        elif kind == "unplugged":
            assert isinstance(dev, PortableDevice)
            dev.set_unplugged(active, fault.away_use_w, at=at)
        elif kind == "delay":
            if g.proxy is None:
                raise RuntimeError(f"{fault.device}: no proxy in front of it for a delay")
            g.proxy.delay_s = (fault.delay_s or 0.0) if active else 0.0
        elif kind == "mode_reset" and active:
            assert isinstance(dev, StorageDevice)
            dev.reset_mode(at=at)
            self._drop(g)
        elif kind == "connection_drop" and active:
            self._drop(g)
        elif kind == "connection_refused":
            self._refuse(g, refuse=active)

    @staticmethod
    def _set_meter_fault(dev: SimDevice, fault: FaultSpec, active: bool, at: float) -> None:
        """A wrong meter reading inside its range: a fixed glitch or a drift from ``at``."""
        if fault.kind == "meter_glitch":
            dev.faults.reading_w = fault.value_w if active else None
        else:
            dev.faults.drift_w_per_s = (fault.drift_w_per_s or 0.0) if active else 0.0
            dev.faults.drift_since = at if active else None

    def _drop(self, g: _Group) -> None:
        if g.proxy is not None:
            g.proxy.drop_connections()
        elif g.server is not None:
            g.server.drop_connections()

    def _refuse(self, g: _Group, *, refuse: bool) -> None:
        loop = asyncio.get_running_loop()
        if refuse:
            self._drop(g)
        target: DelayProxy | ModbusServer | None = g.proxy or g.server
        if target is None:
            return
        coro = target.refuse_connections() if refuse else target.accept_connections()
        task = loop.create_task(coro)
        task.add_done_callback(_log_failure)


def _both_exist(*paths: str) -> bool:
    # A stat per path: cheap enough not to need a thread.
    return all(Path(p).exists() for p in paths)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("fault injection failed: %s", task.exception())
