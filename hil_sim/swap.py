"""A simulated battery-swap station: packs in charging slots, taxis arriving for swaps by a
time-of-day Poisson process, and the service level as it happened.

Units: power W (> 0 a slot draws from the site), energy Wh, SoC ratio 0..1, epoch s.
A swap takes the pack with the highest SoC (a charged one: SoC >= the target; a swap that finds
none is *missed*) and docks the taxi's depleted pack into the freed slot. Slots charge at the
power they are given, clipped to the slot charger's limit and to what the pack still takes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class SimPack:
    """One pack in a slot."""

    slot: str
    capacity_wh: float
    energy_wh: float
    max_charge_w: float
    efficiency: float = 0.95

    @property
    def soc(self) -> float:
        """State of charge, ratio."""
        return self.energy_wh / self.capacity_wh


@dataclass(frozen=True, slots=True)
class SwapEvent:
    """One taxi's visit: when, which slot, the SoC taken out and put in; missed: no charged
    pack was there (the taxi left with its own)."""

    time: float
    slot: str
    soc_out: float
    soc_in: float
    missed: bool


def poisson_swaps(
    start: float, end: float, rate_per_hour: Callable[[float], float], rng: random.Random
) -> list[float]:
    """Swap times in [start, end) of a Poisson process whose rate follows ``rate_per_hour(t)``
    (thinning against the largest hourly rate)."""
    peak = max(rate_per_hour(start + 3600.0 * h) for h in range(int((end - start) // 3600) + 1))
    if peak <= 0:
        return []
    out: list[float] = []
    t = start
    while True:
        t += rng.expovariate(peak / 3600.0)
        if t >= end:
            return out
        if rng.random() < rate_per_hour(t) / peak:
            out.append(t)


@dataclass(slots=True)
class SimSwapStation:
    """The station's physics: packs, slot power, swaps and the service-level record."""

    packs: dict[str, SimPack]
    target_soc: float
    rng: random.Random
    arrival_soc: tuple[float, float] = (0.10, 0.30)
    power_w: dict[str, float] = field(default_factory=dict)
    events: list[SwapEvent] = field(default_factory=list)

    def charged(self) -> int:
        """Packs at or above the target SoC."""
        return sum(p.soc >= self.target_soc - 1e-9 for p in self.packs.values())

    def set_power(self, power_w: Mapping[str, float]) -> None:
        """Slot powers (W >= 0) to apply from now; slots not named get 0."""
        self.power_w = {s: max(float(power_w.get(s, 0.0)), 0.0) for s in self.packs}

    def run(self, seconds: float) -> float:
        """Charge for ``seconds`` at the set powers; returns the station's AC energy (Wh)."""
        total = 0.0
        for slot, pack in self.packs.items():
            p = min(self.power_w.get(slot, 0.0), pack.max_charge_w)
            room = max(pack.capacity_wh - pack.energy_wh, 0.0) / pack.efficiency
            ac = min(p * seconds / 3600.0, room)
            pack.energy_wh = min(pack.energy_wh + ac * pack.efficiency, pack.capacity_wh)
            total += ac
        return total

    def drawn_w(self) -> float:
        """Power the slots draw now, W (each clipped to what its pack takes)."""
        return sum(
            min(self.power_w.get(s, 0.0), p.max_charge_w) if p.soc < 1.0 - 1e-9 else 0.0
            for s, p in self.packs.items()
        )

    def swap(self, t: float) -> SwapEvent:
        """A taxi arrives: the best charged pack out, a depleted one in."""
        slot, best = max(self.packs.items(), key=lambda kv: kv[1].soc)
        soc_in = self.rng.uniform(*self.arrival_soc)
        if best.soc < self.target_soc - 1e-9:
            event = SwapEvent(t, slot, best.soc, math.nan, missed=True)
        else:
            event = SwapEvent(t, slot, best.soc, soc_in, missed=False)
            best.energy_wh = soc_in * best.capacity_wh
        self.events.append(event)
        return event
