"""Wall time of HIL runs: every shipped scenario, and a simulated day of one-minute cycles on
the example site (the real control core, real Modbus over loopback, a stepped clock).

A simulated day of one-minute cycles must take well under 60 s of wall time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import time
from pathlib import Path

from benchmarks import Result
from essd.hil.runner import run_scenario
from essd.hil.scenario import load_scenario
from tests.support.hil import SHIPPED
from tests.support.site import EXAMPLE


def _example_day(folder: Path) -> Path:
    """A day on the example site (Liangjiang microgrid) at one-minute cycles."""
    hours = range(24)
    shift = [1.0 if 8 <= h < 20 else 0.0 for h in hours]
    load = [
        round(24_000 + 50_000 * s + 6_000 * math.sin(h / 3.0) ** 2)
        for h, s in zip(hours, shift, strict=True)
    ]
    pv = [
        round(max(0.0, 38_000 * math.cos((h + 0.5 - 12.5) / 6.0 * math.pi / 2)))
        if abs(h + 0.5 - 12.5) < 6
        else 0
        for h in hours
    ]
    path = folder / "example-day.yaml"
    lines = [
        "name: example-day",
        "site:",
        f"  config: {EXAMPLE}",
        "  export_limiter: true",
        "start: 2026-01-14T00:00:00+08:00",
        "duration: 1d",
        "cycle_period: 1m",
        "series:",
        "  inline:",
        "    step_s: 1h",
        f"    load_w: {load}",
        f"    pv_w: {pv}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run(path: Path, workdir: Path) -> float:
    scenario, settings = load_scenario(path)
    started = time.perf_counter()
    asyncio.run(run_scenario(scenario, settings, workdir=workdir))
    return time.perf_counter() - started


def run() -> list[Result]:
    """All shipped scenarios back to back, then the example day."""
    logging.getLogger("essd").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-hil-") as tmp:
        folder = Path(tmp)
        total = 0.0
        for path in sorted(SHIPPED.glob("*.yaml")):
            total += _run(path, folder / path.stem)
        day = _run(_example_day(folder), folder / "example-day")
    return [
        Result("hil.scenarios_wall_s", total, "s"),
        Result("hil.day_wall_s", day, "s"),
    ]


if __name__ == "__main__":
    for r in run():
        print(f"{r.name} {r.value:.2f} {r.unit}")
