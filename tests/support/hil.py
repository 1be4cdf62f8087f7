"""A small HIL scenario for tests that need a real run but not a whole day."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SHIPPED = Path(__file__).parents[2] / "profiles" / "scenarios"

SMALL: dict[str, Any] = {
    "name": "small-household",
    "description": "Two evening hours: the battery covers the price peak, then refills.",
    "site": {
        "settings": {
            "site": {
                "id": "test-home",
                "timezone": "Asia/Shanghai",
                "grid_import_limit_w": 9000,
                "grid_export_limit_w": 3000,
            },
            "control": {"step_s": 900, "horizon_steps": 16, "solver": "HIGHS"},
            "tariff": {"currency": "CNY", "import_price_per_kwh": 0.6, "export_price_per_kwh": 0.2},
            "devices": [
                {"id": "home", "profile": "household-hybrid-forcible"},
                {"id": "meter", "profile": "site-meter"},
            ],
        },
        "initial_soc": {"home": 0.8},
    },
    "start": "2026-07-01T17:00:00+08:00",
    "duration": "2h",
    "cycle_period": "5m",
    "series": {
        "inline": {
            "step_s": "30m",
            "load_w": [1500, 1800, 2000, 1600, 1200],
            "pv_w": [400, 100, 0, 0, 0],
            "import_price": [1.0, 1.0, 0.3, 0.3, 0.3],
            "export_price": [0.2, 0.2, 0.2, 0.2, 0.2],
            "carbon_g_per_kwh": [600, 610, 620, 620, 620],
        }
    },
    "expect": {"max_violations": 0, "worst_rung": 2, "min_savings": 0.5},
}


def write_scenario(path: Path, **changes: Any) -> Path:
    """Write the small scenario with top-level ``changes`` merged in (None deletes a key)."""
    data = {**SMALL}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
