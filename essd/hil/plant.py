"""The plant a HIL scenario runs against, and the seam to the simulator.

:class:`Plant` is what the runner needs from a simulated site: the settings pointing at its
loopback devices, the *true* state (not the daemon's belief) and a switch per fault.
``hil_sim``'s simulated site is adapted to it; until that lands, :class:`StandInPlant` is a
deliberately small stand-in: each device's shipped profile served as a register image over
real loopback Modbus, commands decoded from what the driver wrote (per device class), an
energy integrator per battery (efficiencies, SoC held in [0, 1], ratings as limits), revert
timers where the profile has them, and faults applied in the register store (no answer,
exception responses, frozen measurements, ignored writes, mode reset, BMS alarm) or in a TCP
proxy (delay). What it does not model (taper, temperature, self-discharge) is hil_sim's job.

Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
Grid = load - PV used - sum(battery).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from drivers.layout import ProfileImage
from drivers.modbus import Framing, ModbusServer
from drivers.profile import Capability, Profile, resolve_profile
from drivers.registers import (
    ModbusExceptionCode,
    NoResponse,
    RegisterAccessError,
    Table,
)
from drivers.sunspec import SunSpecImage, build_sunspec_image
from essd.clock import Clock
from essd.config import DeviceConfig, Settings
from essd.domain import DeviceClass
from essd.hil.scenario import FaultSpec

__all__ = [
    "BatteryTruth",
    "Plant",
    "SiteTruth",
    "StandInPlant",
    "TrueSeries",
    "open_stand_in_plant",
]


@dataclass(frozen=True, slots=True)
class BatteryTruth:
    """One unit as it really is. ``power_w`` > 0 discharges; limits are magnitudes (W)."""

    device_id: str
    soc: float
    energy_wh: float
    capacity_wh: float
    power_w: float
    commanded_w: float
    max_charge_w: float
    max_discharge_w: float
    available: bool
    alarm: bool


@dataclass(frozen=True, slots=True)
class SiteTruth:
    """The whole site now: the true series values and every unit.

    ``pv_w`` is the PV actually produced (after any export-limiter curtailment),
    ``pv_available_w`` what the panels could have produced. ``grid_w`` > 0 imports.
    """

    time: float
    load_w: float
    pv_w: float
    pv_available_w: float
    grid_w: float
    batteries: Mapping[str, BatteryTruth]


class TrueSeries(Protocol):
    """What really happens at the site at epoch ``t``: load and PV in W."""

    def load_w(self, t: float) -> float:
        """True site load (W >= 0)."""
        ...

    def pv_w(self, t: float) -> float:
        """True available PV (W >= 0)."""
        ...


class Plant(Protocol):
    """A simulated site the runner drives (hil_sim's SimulatedSite adapts to this)."""

    @property
    def settings(self) -> Settings:
        """The site settings with every transport pointing at the served devices."""
        ...

    def truth(self) -> SiteTruth:
        """Advance to the clock's now and return the true state."""
        ...

    def set_fault(self, fault: FaultSpec, active: bool) -> None:
        """Start or clear one fault of the timeline."""
        ...


# --- register stores with faults ----------------------------------------------------------


@dataclass
class _Faults:
    silent: bool = False
    exception: int = 0  # Modbus exception code answered to every request, 0 = none
    frozen: bool = False
    ignore_writes: bool = False
    bms: bool = False
    delay_s: float = 0.0
    away_use_w: float = 0.0
    unplugged: bool = False


Image = ProfileImage | SunSpecImage


class _FaultyStore:
    """A device's register image as the wire sees it, with the plant's faults applied."""

    def __init__(self, image: Image, faults: _Faults, touch: Callable[[], None]) -> None:
        self.image = image
        self.faults = faults
        self._touch = touch

    def _gate(self) -> None:
        if self.faults.silent or self.faults.unplugged:
            raise NoResponse
        if self.faults.exception:
            raise RegisterAccessError(ModbusExceptionCode(self.faults.exception))

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Advance the plant, then answer from the image (unless a fault says otherwise)."""
        self._gate()
        self._touch()
        return self.image.read(table, address, count)

    def write(self, address: int, values: Sequence[int]) -> None:
        """Take a write; with ``ignore_writes`` it is acknowledged and dropped."""
        self._gate()
        self._touch()
        if self.faults.ignore_writes:
            self.image.read(Table.HOLDING, address, len(values))  # address errors still answer
            return
        self.image.write(address, values)


# --- device models ------------------------------------------------------------------------


@dataclass
class _Unit:
    """One simulated storage unit: its image, command decoder and energy state."""

    config: DeviceConfig
    profile: Profile
    image: Image
    faults: _Faults
    energy_wh: float
    capacity_wh: float
    written_at: float | None = None
    command_w: float = 0.0
    expires_at: float = math.inf
    power_w: float = 0.0

    @property
    def kind(self) -> str:
        p = self.profile
        if p.driver == "sunspec":
            return "pcs"
        if "setpoint_w" in p.fields:
            return "setpoint"
        if p.has(Capability.ACTIVE_POWER):
            return "forcible"
        return "portable"

    def limits(self) -> tuple[float, float]:
        r = self.profile.ratings
        if self.faults.bms or self.faults.unplugged:
            return 0.0, 0.0
        ch = r.max_charge_w if self.energy_wh < self.capacity_wh else 0.0
        dis = r.max_discharge_w if self.energy_wh > 0.0 else 0.0
        if self.kind == "portable":
            dis = 0.0  # its outputs feed the campers, not the site
        return ch, dis

    def decode(self, now: float) -> None:
        """The command the device acts on, from what the driver wrote into its registers."""
        img = self.image
        kind = self.kind
        self.written_at = now
        if kind == "pcs":
            assert isinstance(img, SunSpecImage)
            enabled = img.get_register("wset_enable") in (1, 1.0, "ENABLED")
            self.command_w = float(img.get_register("wset_w") or 0.0) if enabled else 0.0
            revert_on = img.get_register("wset_revert_enable") in (1, 1.0, "ENABLED")
            t = float(img.get_register("wset_revert_time_s") or 0.0)
            self.expires_at = now + t if revert_on and t > 0 else math.inf
        elif kind == "forcible":
            assert isinstance(img, ProfileImage)
            mode = img.get_value("forcible_charge_discharge")
            spec = img.spec("forcible_charge_discharge_period")
            raw_period = img.get_value(spec.name)
            minutes = float(raw_period) if isinstance(raw_period, float) else 0.0
            period = minutes * (60.0 if spec.unit == "min" else 1.0)
            if mode == 1:
                self.command_w = -float(img.get_value("forcible_charge_power") or 0.0)
            elif mode == 2:
                self.command_w = float(img.get_value("forcible_discharge_power") or 0.0)
            else:
                self.command_w = 0.0
            self.expires_at = now + period if period > 0 and mode in (1, 2) else math.inf
        elif kind == "setpoint":
            assert isinstance(img, ProfileImage)
            value = img.get_field("setpoint_w")
            self.command_w = float(value) if isinstance(value, float) else 0.0
            timeout = self.profile.behaviour.setpoint_timeout_s
            self.expires_at = now + timeout if timeout else math.inf
        else:
            assert isinstance(img, ProfileImage)
            value = img.get_field("ac_charge_limit_w")
            self.command_w = -float(value) if isinstance(value, float) else 0.0
            self.expires_at = math.inf

    def mode_reset(self) -> None:
        """The device drops its commanded mode, as after a firmware watchdog reset."""
        img = self.image
        if self.kind == "pcs":
            assert isinstance(img, SunSpecImage)
            img.set_register("wset_enable", 0)
        elif self.kind == "forcible":
            assert isinstance(img, ProfileImage)
            img.set_value("forcible_charge_discharge", 0)
        elif self.kind == "setpoint":
            assert isinstance(img, ProfileImage)
            img.set_field("setpoint_w", 0.0)
        self.command_w = 0.0

    def integrate(self, t0: float, t1: float) -> None:
        """Energy over [t0, t1] at the current command, limits and SoC bounds."""
        if t1 <= t0:
            return
        if self.faults.unplugged:
            drain = self.faults.away_use_w * (t1 - t0) / 3600.0
            self.energy_wh = max(0.0, self.energy_wh - drain)
            self.power_w = 0.0
            return
        r = self.profile.ratings
        cmd = self.command_w if t0 < self.expires_at else 0.0
        ch, dis = self.limits()
        p = min(max(cmd, -ch), dis)
        self.power_w = p
        if p == 0.0:
            return
        hours = (t1 - t0) / 3600.0
        if p < 0:
            room = self.capacity_wh - self.energy_wh
            stored = min(-p * r.charge_efficiency * hours, room)
            self.energy_wh += stored
        else:
            drawn = min(p / r.discharge_efficiency * hours, self.energy_wh)
            self.energy_wh -= drawn
        self.energy_wh = min(max(self.energy_wh, 0.0), self.capacity_wh)

    def publish(self, now: float) -> None:
        """Measurements into the registers (skipped while frozen)."""
        if self.faults.frozen:
            return
        img = self.image
        soc = self.energy_wh / self.capacity_wh
        ch, dis = self.limits()
        values: dict[str, float] = {"soc": soc}
        if self.kind in ("pcs", "forcible"):
            # A real unit's measurement wobbles (about 0.2 % of the rating, above the register's
            # resolution); a constant one is what "frozen" looks like.
            amplitude = max(5.0, 0.002 * self.profile.ratings.max_discharge_w)
            values["power_w"] = self.power_w + (_noise(now, amplitude) if self.power_w else 0.0)
        elif self.kind == "setpoint":
            wobble = _noise(now, 5.0) if self.power_w else 0.0
            values["ac_output_w"] = max(self.power_w + wobble, 0.0)
            values["ac_input_w"] = max(-self.power_w - wobble, 0.0)
        else:
            values["ac_input_w"] = max(-self.power_w, 0.0)
            values["ac_output_w"] = 0.0
            values["dc_output_w"] = 0.0
            values["dc_input_w"] = 0.0
        if self.kind == "pcs":
            values["max_charge_w"] = ch
            values["max_discharge_w"] = dis
        for name, v in values.items():
            if name in self.profile.fields:
                img.set_field(name, v, check_range=False)
        alarm = 1.0 if self.faults.bms else 0.0
        for name in self.profile.fields:
            if name.startswith(("alarm", "fault")):
                img.set_field(name, alarm, check_range=False)


@dataclass
class _Meter:
    image: Image
    faults: _Faults


def _noise(t: float, amplitude_w: float) -> float:
    """Deterministic measurement noise in [-amplitude, amplitude] W (a hash of the time)."""
    x = math.sin(t * 12.9898 + 78.233) * 43758.5453
    return (2.0 * (x - math.floor(x)) - 1.0) * amplitude_w


def _initial_image(profile: Profile) -> Image:
    image: Image = (
        build_sunspec_image(profile) if profile.driver == "sunspec" else ProfileImage(profile)
    )
    r = profile.ratings
    defaults = {
        "max_charge_w": r.max_charge_w,
        "max_discharge_w": r.max_discharge_w,
        "max_charge_a": r.max_charge_w / 800.0,
        "max_discharge_a": r.max_discharge_w / 800.0,
        "dc_voltage_v": 800.0,
        "capacity_wh": r.capacity_wh,
        "rated_capacity_wh": r.capacity_wh,
        "max_charge_setting_w": r.max_charge_w,
        "max_discharge_setting_w": r.max_discharge_w,
        "max_soc": 1.0,
        "min_soc": 0.0,
        "ac_output_on": 1.0,
        "dc_output_on": 1.0,
        "frequency_hz": 50.0,
    }
    for name, value in defaults.items():
        if name in profile.fields:
            with contextlib.suppress(Exception):  # read-only or derived: the device decides
                image.set_field(name, value)
    return image


@dataclass
class StandInPlant:
    """The stand-in simulated site (see the module docstring)."""

    clock: Clock
    series: TrueSeries
    site_settings: Settings
    export_limiter: bool = False
    units: dict[str, _Unit] = field(default_factory=dict)
    meter: _Meter | None = None
    served: Settings | None = None
    _t: float = 0.0
    _faults: dict[str, _Faults] = field(default_factory=dict)
    servers: dict[str, ModbusServer] = field(default_factory=dict)
    _fresh_at: float | None = None
    _dirty: bool = True
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _pv_used: float = 0.0
    _grid: float = 0.0

    @property
    def settings(self) -> Settings:
        """The settings with loopback transports (after :func:`open_stand_in_plant`)."""
        assert self.served is not None
        return self.served

    def advance(self) -> None:
        """Integrate every unit to the clock's now and refresh the registers."""
        now = self.clock.now()
        if now == self._fresh_at and not self._dirty:
            return  # every request of a cycle comes at the same instant: nothing moved
        t = self._t
        # Sub-steps of at most a minute, so a SoC bound or a revert timer lands close to when
        # it happens and load/PV are sampled often.
        while t < now:
            nxt = min(now, t + 60.0)
            for u in self.units.values():
                if u.expires_at <= t:
                    u.command_w = 0.0
                    u.expires_at = math.inf
                u.integrate(t, nxt)
            t = nxt
        self._t = max(self._t, now)
        for u in self.units.values():
            ch, dis = u.limits()
            cmd = u.command_w if now < u.expires_at else 0.0
            u.power_w = 0.0 if u.faults.unplugged else min(max(cmd, -ch), dis)
            u.publish(now)
        self._balance(now)
        self._fresh_at, self._dirty = now, False

    def _balance(self, now: float) -> None:
        load = self.series.load_w(now)
        pv = self.series.pv_w(now)
        bat = sum(u.power_w for u in self.units.values())
        pv_used = pv
        if self.export_limiter:
            # The PV inverter curtails itself to keep the export within the limit.
            floor = -self.site_settings.site.grid_export_limit_w
            pv_used = min(pv, max(0.0, load - bat - floor))
        self._pv_used = pv_used
        self._grid = load - pv_used - bat
        if self.meter is not None and not self.meter.faults.frozen:
            self.meter.image.set_field(
                "grid_power_w",
                self._grid + _noise(now, 3.0 + 0.001 * abs(self._grid)),
                check_range=False,
            )

    def _on_write(self, dev_id: str) -> Callable[[tuple[str, ...]], None]:
        def listener(_names: tuple[str, ...]) -> None:
            self.advance()  # the old command acted until now
            self.units[dev_id].decode(self.clock.now())
            self._dirty = True
            self.advance()

        return listener

    def truth(self) -> SiteTruth:
        """Advance to now and return the true state."""
        self.advance()
        now = self.clock.now()
        batteries = {}
        for dev_id, u in self.units.items():
            ch, dis = u.limits()
            batteries[dev_id] = BatteryTruth(
                device_id=dev_id,
                soc=u.energy_wh / u.capacity_wh,
                energy_wh=u.energy_wh,
                capacity_wh=u.capacity_wh,
                power_w=u.power_w,
                commanded_w=u.command_w if now < u.expires_at else 0.0,
                max_charge_w=ch,
                max_discharge_w=dis,
                available=not u.faults.unplugged,
                alarm=u.faults.bms,
            )
        return SiteTruth(
            time=now,
            load_w=self.series.load_w(now),
            pv_w=self._pv_used,
            pv_available_w=self.series.pv_w(now),
            grid_w=self._grid,
            batteries=batteries,
        )

    def set_fault(self, fault: FaultSpec, active: bool) -> None:
        """Apply or clear a fault on its device."""
        self.advance()
        f = self._faults[fault.device]
        kind = fault.kind
        if kind in ("comm_loss", "meter_loss"):
            f.silent = active
        elif kind == "exception_responses":
            f.exception = fault.code if active else 0
        elif kind == "frozen_registers":
            f.frozen = active
        elif kind == "ignored_writes":
            f.ignore_writes = active
        elif kind == "bms_fault":
            f.bms = active
        elif kind == "delay":
            f.delay_s = (fault.delay_s or 0.0) if active else 0.0
        elif kind == "unplugged":
            f.unplugged = active
            f.away_use_w = fault.away_use_w if active else 0.0
            unit = self.units.get(fault.device)
            if unit is not None and active:
                unit.command_w = 0.0  # unplugged: the charge setting is lost with the link
        else:
            self._connection_fault(fault, active)
        self._dirty = True
        self.advance()

    def _connection_fault(self, fault: FaultSpec, active: bool) -> None:
        """Mode reset (a device restart), dropped and refused connections."""
        server = self.servers[fault.device]
        if fault.kind == "mode_reset" and active:
            unit = self.units.get(fault.device)
            if unit is not None:
                unit.mode_reset()
            server.drop_connections()  # a restarted device has forgotten its connections
        elif fault.kind == "connection_drop" and active:
            server.drop_connections()
        elif fault.kind == "connection_refused":
            if active:
                server.drop_connections()
            task = asyncio.get_running_loop().create_task(
                server.refuse_connections() if active else server.accept_connections()
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float]
) -> None:
    try:
        while data := await reader.read(4096):
            d = delay()
            if d > 0:
                # A network delay is real time by nature (the client's timeouts are real too).
                await asyncio.sleep(d)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _delay_proxy(port: int, delay: Callable[[], float]) -> AsyncIterator[int]:
    """A loopback TCP proxy to ``port`` that holds every answer ``delay()`` real seconds."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            cw.close()
            return
        for t in (
            asyncio.create_task(_pipe(cr, sw, lambda: 0.0)),
            asyncio.create_task(_pipe(sr, cw, delay)),
        ):
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def _delay_of(faults: _Faults) -> Callable[[], float]:
    return lambda: faults.delay_s


@contextlib.asynccontextmanager
async def open_stand_in_plant(
    settings: Settings,
    *,
    clock: Clock,
    series: TrueSeries,
    initial_soc: Mapping[str, float],
    export_limiter: bool = False,
    delayed: Sequence[str] = (),
) -> AsyncIterator[StandInPlant]:
    """Serve every device of ``settings`` on loopback and yield the running plant.

    ``delayed`` names devices served through a delay proxy (for ``delay`` faults).
    """
    plant = StandInPlant(
        clock=clock, series=series, site_settings=settings, export_limiter=export_limiter
    )
    plant._t = clock.now()
    devices = []
    async with contextlib.AsyncExitStack() as stack:
        for dev in settings.devices:
            profile = resolve_profile(dev.profile, settings.profile_dirs)
            image = _initial_image(profile)
            faults = _Faults()
            plant._faults[dev.id] = faults
            if profile.device_class is DeviceClass.METER:
                plant.meter = _Meter(image, faults)
            else:
                cap = dev.capacity_wh or profile.ratings.capacity_wh or 1000.0
                soc = initial_soc.get(dev.id, profile.simulation.initial_soc)
                unit = _Unit(
                    config=dev,
                    profile=profile,
                    image=image,
                    faults=faults,
                    energy_wh=soc * cap,
                    capacity_wh=cap,
                )
                plant.units[dev.id] = unit
                image.add_write_listener(plant._on_write(dev.id))
            store = _FaultyStore(image, faults, plant.advance)
            framing = Framing.RTU if dev.transport.kind == "rtu-over-tcp" else Framing.SOCKET
            unit_id = getattr(dev.transport, "unit", 1)
            server = ModbusServer.tcp({unit_id: store}, framing=framing)
            await stack.enter_async_context(server)
            plant.servers[dev.id] = server
            port = server.port
            if dev.id in delayed:
                port = await stack.enter_async_context(_delay_proxy(server.port, _delay_of(faults)))
            transport = {
                "kind": "rtu-over-tcp" if framing is Framing.RTU else "tcp",
                "host": "127.0.0.1",
                "port": port,
                "unit": unit_id,
            }
            devices.append(
                dev.model_copy(
                    update={
                        "transport": type(dev)
                        .model_validate({**dev.model_dump(), "transport": transport})
                        .transport
                    }
                )
            )
        plant.served = settings.model_copy(update={"devices": tuple(devices)})
        plant.advance()
        yield plant
