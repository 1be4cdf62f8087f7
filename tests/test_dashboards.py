"""The Grafana dashboards are generated: the committed JSON must equal the generator's output,
and the generated dashboards must have what the issue asks of them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.prometheus import (
    DASHBOARD_DIR,
    DASHBOARDS,
    OBSERVABILITY,
    all_panels,
    dashboard,
    dashboard_queries,
)

GENERATOR = OBSERVABILITY / "grafana" / "generate.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("essd_grafana_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_makes_exactly_the_committed_dashboards() -> None:
    gen = _generator()
    assert sorted(gen.DASHBOARDS) == sorted(DASHBOARDS)
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(DASHBOARDS)
    for name, build in gen.DASHBOARDS.items():
        committed = (DASHBOARD_DIR / name).read_text()
        assert committed == gen.render(build), f"{name}: run `make dashboards`"


def test_the_check_mode_fails_on_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = _generator()
    for name in DASHBOARDS:
        (tmp_path / name).write_text((DASHBOARD_DIR / name).read_text())
    monkeypatch.setattr(gen, "OUT", tmp_path)
    assert gen.main(["--check"]) == 0
    (tmp_path / "essd-site.json").write_text("{}\n")
    assert gen.main(["--check"]) == 1


def test_make_dashboards_check_passes() -> None:
    out = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def _queries(name: str) -> str:
    return "\n".join(q.expr for q in dashboard_queries(dashboard(name)))


def test_the_site_overview_shows_the_sites_energy() -> None:
    text = _queries("essd-site.json")
    for metric in (
        "essd_grid_power_watts",
        "essd_site_net_load_watts",
        "essd_site_pv_power_watts",
        "essd_device_power_watts",
        "essd_device_soc_ratio",
        "essd_tariff_import_price_per_kwh",
        "essd_grid_carbon_intensity_grams_per_kwh",
        "essd_plan_grid_power_watts",
        "essd_plan_ahead_battery_power_watts",
        "essd_forecast_ahead_pv_watts",
        "essd_site_battery_charged_energy_joules_total",
        "essd_site_savings",
        "essd_site_co2_grams",
        "essd_billing_peak_import_watts",
        "essd_device_alarms",
    ):
        assert metric in text, metric
    periods = {
        p.get("timeFrom") for p in all_panels(dashboard("essd-site.json")) if p["type"] == "stat"
    }
    assert {"now/d", "now/M"} <= periods  # today so far, this month so far


def test_the_fleet_view_has_one_row_per_site() -> None:
    (table,) = [p for p in all_panels(dashboard("essd-fleet.json")) if p["type"] == "table"]
    assert all(t.get("instant") and t.get("format") == "table" for t in table["targets"])
    assert {"id": "merge", "options": {}} in table["transformations"]
    # Every query keeps the instance label, which the merge joins the rows on.
    for t in table["targets"]:
        assert "by (instance" in t["expr"], t["expr"]
    (site,) = [v for v in dashboard("essd-fleet.json")["templating"]["list"] if v["name"] == "site"]
    assert site["includeAll"]
