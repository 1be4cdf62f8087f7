"""What the cycle publishes is what happened: one record per cycle, read by the metrics.

- An inverter that refuses every write (a real Modbus exception over loopback) is not
  "running": its state becomes ``write_failed``, its setpoint age grows from the last accepted
  write, and the scraped series fire ``EssdSetpointExpired`` and ``EssdDeviceWriteFailing``
  in a promtool rule test built from what the exporter served.
- The SoC window the metrics publish is the one the guard enforced, for every device.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from essd.domain import DeviceState
from essd.events import WriteStatus
from essd.metrics import MetricsExporter
from hil_sim.store import ModbusExceptionCode, RegisterAccessError
from tests.support.prometheus import ALERTS, program
from tests.test_cycle import Site, site  # noqa: F401 - the fixture is used by name


def scrape(exporter: MetricsExporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(exporter.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_refused_writes_age_the_setpoint_mark_the_device_and_fire_alerts(
    site: Site,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    exporter = MetricsExporter(clock=site.clock, process_metrics=False)
    exporter.attach(site.controller.bus)
    first = await site.cycle()
    assert first.devices["inv"].write.status is WriteStatus.WRITTEN
    assert first.devices["inv"].setpoint_age_s == 0.0

    def refuse(address: int, values: Any) -> None:
        raise RegisterAccessError(ModbusExceptionCode.SERVER_DEVICE_FAILURE)

    monkeypatch.setattr(site.inverter, "write", refuse)
    ages, failures, states = [], [], []
    for k in range(31):  # 310 s of an inverter refusing every write, 10 s cycles
        site.meter.set_field("grid_power_w", 2000.0 + 400.0 * (k % 3))  # the load moves
        # The unit goes on with the last setpoint it accepted (3 kW), as a real one would.
        site.inverter.set_field("power_w", 3000.0)
        site.inverter.set_field("soc", 0.5 - 0.002 * (k + 1))
        event = await site.cycle()
        record = event.devices["inv"]
        assert record.write.status is WriteStatus.FAILED
        assert "exception" in record.write.error
        s = scrape(exporter)
        ages.append(value(s, "essd_device_setpoint_age_seconds", device="inv"))
        failures.append(value(s, "essd_device_write_failures", device="inv"))
        states.append(event.device_states["inv"])
    # The age counts from the last accepted write: it grows by the cycle period every cycle
    # (each scrape comes 10 s after its cycle, as the stepped clock moved on).
    assert ages == [pytest.approx(10.0 * (k + 2)) for k in range(31)]
    assert failures[-1] == 31.0
    assert states[0] is DeviceState.RUNNING  # one failure is not yet a state
    assert set(states[1:]) == {DeviceState.WRITE_FAILED}
    s = scrape(exporter)
    assert value(s, "essd_device_state", device="inv", state="write_failed") == 1.0

    # The rules on the series the exporter served, sampled every 30 s as Prometheus would.
    ttl = value(s, "essd_device_setpoint_ttl_seconds", device="inv")
    series = {
        "essd_device_setpoint_age_seconds": ages[2::3],
        "essd_device_setpoint_ttl_seconds": [ttl] * len(ages[2::3]),
        "essd_device_write_failures": failures[2::3],
    }
    labels = 'job="essd", instance="gw1:9108", device="inv"'
    age, failed = series["essd_device_setpoint_age_seconds"][9], failures[2::3][9]  # at 4m30s
    rules = {r["alert"]: r["annotations"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
             for r in g["rules"]}  # fmt: skip
    expected = {
        "EssdSetpointExpired": {
            "summary": "Setpoint of inv on gw1:9108 is older than its TTL",
            "description": rules["EssdSetpointExpired"]["description"].replace(
                "{{ $value | humanizeDuration }}", f"{int(age // 60)}m {int(age % 60)}s"
            ),
        },
        "EssdDeviceWriteFailing": {
            "summary": f"Writes to inv on gw1:9108 fail ({failed:.0f} cycles in a row)",
            "description": rules["EssdDeviceWriteFailing"]["description"],
        },
    }
    case = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": [
                    {"series": f"{name}{{{labels}}}", "values": " ".join(f"{v:g}" for v in vals)}
                    for name, vals in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "4m30s",
                        "alertname": name,
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "job": "essd",
                                    "instance": "gw1:9108",
                                    "device": "inv",
                                },
                                "exp_annotations": annotations,
                            }
                        ],
                    }
                    for name, annotations in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "refused_writes_test.yml"
    path.write_text(yaml.safe_dump(case))
    result = await asyncio.to_thread(
        subprocess.run,
        [program("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # Writes accepted again: the device is controlled again and the age starts over.
    monkeypatch.undo()
    event = await site.cycle()
    assert event.devices["inv"].write.status is WriteStatus.WRITTEN
    event = await site.cycle()
    assert event.device_states["inv"] is DeviceState.RUNNING
    assert event.devices["inv"].write.consecutive_failures == 0


async def test_metrics_publish_the_soc_window_the_guard_enforces(
    site: Site,  # noqa: F811 - the fixture
) -> None:
    # Device settings looser than the site's: the guard keeps the tighter of both, and an
    # operator reserve on top. Before, the metrics showed the device's own 0.05 and 1.0.
    ctl = site.controller
    inv = ctl.devices["inv"]
    inv.config = inv.config.model_copy(update={"reserve_soc": 0.05, "max_soc": 1.0})
    exporter = MetricsExporter(clock=site.clock, process_metrics=False)
    exporter.attach(ctl.bus)
    await site.cycle()
    ctl.set_reserve(0.3)
    event = await site.cycle()
    s = scrape(exporter)
    for d in ctl.batteries:
        env = ctl._envelope(d)  # what the guard was given
        assert value(s, "essd_device_soc_reserve_ratio", device=d.id) == env.reserve_soc == 0.3
        assert value(s, "essd_device_soc_max_ratio", device=d.id) == env.max_soc == 0.95
        limits = event.devices[d.id].limits
        assert limits is not None
        assert (limits.reserve_soc, limits.max_soc) == (env.reserve_soc, env.max_soc)
