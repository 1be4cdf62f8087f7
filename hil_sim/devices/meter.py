"""The simulated site meter: grid power at the point of connection (W > 0 imports, < 0 exports),
published into its registers with a little deterministic measurement noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from drivers.profile import Profile
from essd.clock import Clock
from hil_sim.devices.base import SimDevice
from hil_sim.profile_image import ProfileImage
from hil_sim.sunspec_image import SunSpecImage

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
