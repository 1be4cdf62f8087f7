"""Site configuration helpers for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from essd.config import Settings
from essd.events import CycleCompleted, Event, EventBus

EXAMPLE = Path(__file__).parents[2] / "profiles" / "sites" / "example.toml"


def write_config(settings: Settings, path: Path, **overrides: Any) -> Path:
    """Write ``settings`` as a TOML file, with section overrides merged in."""
    data = settings.model_dump(mode="json", exclude_none=True)
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(tomli_w.dumps(data))
    return path


def cycles_of(bus: EventBus) -> list[CycleCompleted]:
    """The list every CycleCompleted published on ``bus`` from now on is appended to."""
    events: list[CycleCompleted] = []

    def record(event: Event) -> None:
        if isinstance(event, CycleCompleted):
            events.append(event)

    bus.subscribe(record)
    return events
