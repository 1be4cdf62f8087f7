"""The base of every simulated device: a register map laid out from the profile (plain or
SunSpec), the faults a test can inject, and named access to registers and fields; and the
simplest device on it, the site meter.
Sign conventions: battery W > 0 discharges into the site, < 0 charges; grid W > 0 imports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from drivers.layout import from_base, to_base
from drivers.profile import ActionName, Profile, WriteStep
from drivers.registers import EncodeError, Table
from essd.clock import Clock
from hil_sim.profile_image import ProfileImage
from hil_sim.store import ModbusExceptionCode, NoResponse, RegisterAccessError
from hil_sim.sunspec_image import SunSpecImage, build_sunspec_image

log = logging.getLogger(__name__)

# How often a simulated unit refreshes the readings in its registers (simulated seconds).
PUBLISH_INTERVAL_S = 0.1


def build_image(profile: Profile, *, unit: int | None = None) -> ProfileImage | SunSpecImage:
    """The register map of ``profile``, laid out by the drivers' own code."""
    if profile.driver == "sunspec":
        return build_sunspec_image(profile, unit=unit)
    return ProfileImage(profile)


@dataclass
class DeviceFaults:
    """Faults a device is under right now (the fault timeline switches them)."""

    no_answer: bool = False  # silence: the client times out (dead device, meter loss)
    exception_code: ModbusExceptionCode | None = None  # every request answers this exception
    frozen: bool = False  # measurements stop updating (a stuck gateway cache)
    ignore_writes: bool = False  # writes acknowledged but not applied
    unplugged: bool = False  # a portable unit away from the site: no answer, no exchange
    away_use_w: float = 0.0  # what the campers draw from an unplugged unit's outputs
    reading_w: float | None = None  # a meter reports this instead of the truth (a glitch)
    drift_w_per_s: float = 0.0  # a meter's reading leaves the truth at this rate...
    drift_since: float | None = None  # ...since this epoch s
    ignore_safe_mode: bool = False  # writes that would take the safe mode are acknowledged only


class SimDevice:
    """Base of every simulated device: a RegisterStore with faults and lazy updates."""

    def __init__(
        self, *, device_id: str, profile: Profile, image: ProfileImage | SunSpecImage, clock: Clock
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.image: ProfileImage | SunSpecImage = image
        self.clock = clock
        self.faults = DeviceFaults()
        self._fresh_at: float | None = None  # simulated time the registers were last published
        self._point_names = {r.point: r.name for r in profile.registers if r.point is not None}
        self._touched: list[str] = []
        self._publish_errors: set[str] = set()
        # matches(): each literal step's value and tolerance, worked out once (by step id; the
        # steps are the profile's own, alive as long as the device).
        self._wants: dict[int, tuple[float | str, float]] = {}
        image.add_write_listener(self._heard)

    # -- RegisterStore -------------------------------------------------------------------------

    def _gate(self) -> None:
        f = self.faults
        if f.no_answer or f.unplugged:
            raise NoResponse
        if f.exception_code is not None:
            raise RegisterAccessError(f.exception_code, "injected exception response")

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Advance the device to now, publish its readings, answer from the registers.

        Like a real unit, which refreshes its registers periodically rather than per request,
        readings are published at most every ``PUBLISH_INTERVAL_S`` of simulated time (writes
        and faults publish at once), so the several block requests of one read see one state.
        """
        self._gate()
        now = self.clock.now()
        if self._fresh_at is None or not 0.0 <= now - self._fresh_at < PUBLISH_INTERVAL_S:
            self.update()
            self._fresh_at = now
        return self.image.read(table, address, count)

    def invalidate(self) -> None:
        """Publish again on the next read even at the same instant (a fault changed)."""
        self._fresh_at = None

    def advance_to_now(self) -> None:
        """Advance the device to now and publish, unless it already was at this very instant
        (a read, a write or the site's truth did it, and no fault changed since)."""
        now = self.clock.now()
        if self._fresh_at != now:
            self.update()
            self._fresh_at = now

    def accepts_function(self, func_code: int, address: int) -> bool:
        """Whether the unit takes a write with ``func_code`` at ``address`` (its image says)."""
        accepts = getattr(self.image, "accepts_function", None)
        return True if accepts is None else bool(accepts(func_code, address))

    def write(self, address: int, values: Sequence[int]) -> None:
        """Validate and apply a client's write, then act on it.

        The device is first advanced to now (the old command ran until now; once per instant:
        a stepped clock's cycle writes several registers at one instant).
        """
        self._gate()
        self.advance_to_now()
        old = self.image.read(Table.HOLDING, address, len(values))  # address errors answer
        if self.faults.ignore_writes:
            return
        self._touched = []
        self.image.write(address, values)
        names = list(dict.fromkeys(self._touched))
        if self.faults.ignore_safe_mode and self.refuses_as_safe_mode(names):
            self._touched = []
            self.image.write(address, old)  # acknowledged, not taken: read-back shows it
            return
        bad = next((n for n in names if not self._in_range(n)), None)
        if bad is not None:
            self._touched = []
            self.image.write(address, old)  # undo: a refused write changes nothing
            spec = self.profile.register(bad)
            raise RegisterAccessError(
                ModbusExceptionCode.ILLEGAL_DATA_VALUE, f"{bad}: outside [{spec.min}, {spec.max}]"
            )
        self.on_write(names)

    def _heard(self, names: tuple[str, ...]) -> None:
        for n in names:
            self._touched.append(self._point_names.get(n, n))

    def _in_range(self, name: str) -> bool:
        try:
            spec = self.profile.register(name)
        except KeyError:
            return True  # a SunSpec point the profile does not map: the model's own rules
        value = self.image.get_value(name)
        if value is None:
            return False  # out of range (plain decode) or a "not implemented" marker
        if isinstance(value, str):
            return True
        return (spec.min is None or value >= spec.min - 1e-9) and (
            spec.max is None or value <= spec.max + 1e-9
        )

    # -- hooks ---------------------------------------------------------------------------------

    def update(self) -> None:
        """Advance to the clock's now and publish readings (unless frozen)."""

    def on_write(self, names: list[str]) -> None:
        """React to a client write of the registers ``names``."""

    def refuses_as_safe_mode(self, names: list[str]) -> bool:
        """Under ``safe_mode_ignored``: True when the write just made put one of the safe
        mode's mode registers (a literal, not a power value) at its safe-mode value."""
        act = self.profile.actions.get(ActionName.SAFE_MODE)
        if act is None:
            return False
        power = self.profile.actions.get(ActionName.SET_ACTIVE_POWER)
        params = {s.register for s in power.writes if s.param is not None} if power else set()
        return any(
            s.value is not None
            and s.register in names
            and s.register not in params
            and self.matches(s)
            for s in act.writes
        )

    # -- register helpers ----------------------------------------------------------------------

    def value(self, name: str) -> float | str | None:
        """A register in the profile's units."""
        return self.image.get_value(name)

    def base_value(self, name: str) -> float | None:
        """A numeric register in essd base units (W, s, ratio), None when invalid."""
        v = self.image.get_value(name)
        if not isinstance(v, float | int):
            return None
        return to_base(float(v), self.profile.register(name).unit)

    def put(self, name: str, value: float | str) -> None:
        """Set a register (profile units), no range check; unrepresentable values are skipped.

        The simulator publishes what the physics says, even outside the register's declared
        range (the driver then reports it invalid, as with a real device).
        """
        try:
            self.image.set_value(name, value, check_range=False)
        except (EncodeError, ValueError, KeyError) as exc:
            if name not in self._publish_errors:  # log once per register, not per read
                self._publish_errors.add(name)
                log.warning("%s: cannot publish %s=%r: %s", self.device_id, name, value, exc)

    def put_base(self, name: str, value: float) -> None:
        """Set a numeric register from a value in essd base units."""
        self.put(name, from_base(value, self.profile.register(name).unit))

    def put_field(self, field: str, value: float) -> None:
        """Set a semantic field (base units) when the profile maps it."""
        reg = self.profile.fields.get(field)
        if reg is not None:
            self.put_base(reg, value)

    def literal(self, step: WriteStep) -> float | str:
        """A step's literal in the register's numeric terms (SunSpec symbols resolved)."""
        assert step.value is not None
        want = step.value
        if isinstance(want, str) and isinstance(self.image, SunSpecImage):
            spec = self.profile.register(step.register)
            if spec.point is not None:
                _, pdef, _ = self.image.map.locate(spec.point)
                if want in pdef.symbols:
                    return float(pdef.symbols[want])
        return want

    def matches(self, step: WriteStep) -> bool:
        """True when the register holds the step's literal value."""
        known = self._wants.get(id(step))
        if known is None:
            want = self.literal(step)
            scale = self.profile.register(step.register).scale
            tolerance = 0.0 if isinstance(want, str) else max(abs(scale) * 0.51, abs(want) * 1e-6)
            known = self._wants[id(step)] = (want, max(tolerance, 1e-9))
        want, tolerance = known
        cur = self.image.get_value(step.register)
        if isinstance(want, str) or isinstance(cur, str) or cur is None:
            return cur == want
        return abs(float(cur) - float(want)) <= tolerance

    def apply_literals(self, action: ActionName) -> bool:
        """Perform an action's literal writes as the device itself (no client involved)."""
        act = self.profile.actions.get(action)
        if act is None:
            return False
        for step in act.writes:
            if step.value is not None:
                self.put(step.register, self.literal(step))
        return True

    def param_register(self, action: ActionName, param: str) -> str | None:
        """The register an action writes ``param`` into, if any."""
        act = self.profile.actions.get(action)
        if act is None:
            return None
        return next((s.register for s in act.writes if s.param == param), None)


# The simulated site meter: grid power at the point of connection (W > 0 imports, < 0 exports),
# published into its registers with a little deterministic measurement noise.


COUNTER_START_WH = 1_000_000.0  # what the energy registers read when the simulation starts


def measurement_noise(t: float, amplitude_w: float) -> float:
    """Deterministic measurement noise in [-amplitude, amplitude] W (a hash of the time)."""
    x = math.sin(t * 12.9898 + 78.233) * 43758.5453
    return (2.0 * (x - math.floor(x)) - 1.0) * amplitude_w


class MeterDevice(SimDevice):
    """The grid meter at the connection point: grid = load - PV - sum(battery), > 0 imports."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: Profile,
        image: ProfileImage | SunSpecImage,
        clock: Clock,
        grid_power_w: Callable[[], float],
        noise_w: float = 3.0,
        noise_ratio: float = 0.001,
    ) -> None:
        super().__init__(device_id=device_id, profile=profile, image=image, clock=clock)
        self._grid = grid_power_w
        self.noise_w = noise_w
        self.noise_ratio = noise_ratio
        self._t = clock.now()
        self._last_w = 0.0
        self.imported_wh = 0.0
        self.exported_wh = 0.0
        self.update()

    def update(self) -> None:
        """Integrate the energy counters, then publish power, phases, frequency, energy."""
        now = self.clock.now()
        grid = self._grid()
        dt_h = max(0.0, now - self._t) / 3600.0
        # Piecewise-constant between readings: the counters are for display and plausibility.
        self.imported_wh += max(self._last_w, 0.0) * dt_h
        self.exported_wh += max(-self._last_w, 0.0) * dt_h
        self._t, self._last_w = now, grid
        if self.faults.frozen:
            return
        # A real meter wobbles by a few watts (class 1: about 0.1 % plus a floor); an exact one
        # would read one constant value at a zero-export limit, which essd rightly takes for
        # frozen registers. The site's truth stays exact.
        measured = grid + measurement_noise(now, self.noise_w + self.noise_ratio * abs(grid))
        f = self.faults
        if f.reading_w is not None:  # a glitch: a wrong value, wobbling as a real reading does
            measured = f.reading_w + (measured - grid)
        elif f.drift_since is not None:
            measured += f.drift_w_per_s * max(0.0, now - f.drift_since)
        self.put_field("grid_power_w", measured)
        for phase in ("grid_l1_w", "grid_l2_w", "grid_l3_w"):
            self.put_field(phase, measured / 3.0)
        self.put_field("frequency_hz", 50.0)
        # The registers count from the meter's reading when the simulation began: a meter in
        # service is not at 0 (and a SunSpec accumulator of 0 means "not implemented").
        for field in ("imported_wh", "import_energy_wh"):  # plain and SunSpec profiles' names
            self.put_field(field, COUNTER_START_WH + self.imported_wh)
        for field in ("exported_wh", "export_energy_wh"):
            self.put_field(field, COUNTER_START_WH + self.exported_wh)
