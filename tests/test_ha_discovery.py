"""Home Assistant discovery against a real mosquitto: every retained discovery payload checked
against Home Assistant's MQTT discovery rules, its templates rendered on the payloads really
retained, per-unit availability (an unplugged portable unit is *unavailable*), removed units
cleared, and the manual setpoint going through the real command path of a real controller.

The rules are Home Assistant's, encoded here from its documentation and source:

- sensor units and state classes per device class: ``DEVICE_CLASS_UNITS`` and
  ``DEVICE_CLASS_STATE_CLASSES`` of ``homeassistant/components/sensor/const.py`` (the classes
  essd uses: power, energy, battery, monetary, enum); ``monetary`` takes an ISO 4217 code and
  only ``total``; ``enum`` takes ``options`` and neither a unit nor a state class;
- the MQTT platforms' configuration variables (sensor, binary_sensor, number, select): the
  keys each accepts and requires, ``availability`` (a list of ``topic`` entries, never beside
  ``availability_topic``) and ``availability_mode`` (all, any, latest);
- discovery topics ``<prefix>/<component>/<node_id>/<object_id>/config`` with ids of
  ``[a-zA-Z0-9_-]``; a ``device`` needs ``identifiers`` (or ``connections``) and ``unique_id``
  ties it to the device registry; ``via_device`` names another device's identifier; an entity
  id is ``<domain>.<lower case, digits, single inner underscores>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import jinja2
import pytest

from drivers.factory import EndpointPool
from essd.clock import RealClock, SimClock
from essd.config import Settings
from essd.daemon import build_controller
from essd.domain import DeviceClass, LiveLimits, Quality, Reading
from essd.events import (
    CycleCompleted,
    DeviceLimits,
    DeviceRecord,
    EventBus,
    WriteOutcome,
    WriteStatus,
)
from essd.mqtt import MqttBridge
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt import T0, RecordingTarget, Watcher, make_cycle, mqtt_config

SITE = "site-a"
NODE = "essd_site_a"
BASE = f"essd/{SITE}"
PREFIX = "homeassistant"

# --- Home Assistant's rules ------------------------------------------------------------------

ENERGY_UNITS = {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh"}
ENERGY_UNITS |= {"cal", "kcal", "Mcal", "Gcal"}
#: DEVICE_CLASS_UNITS (None: no unit); monetary is checked as an ISO 4217 code.
SENSOR_UNITS: dict[str, set[str | None]] = {
    "power": {"W", "kW", "MW", "GW", "TW"},
    "energy": set(ENERGY_UNITS),
    "battery": {"%"},
    "enum": {None},
}
#: DEVICE_CLASS_STATE_CLASSES.
SENSOR_STATE_CLASSES: dict[str, set[str]] = {
    "power": {"measurement"},
    "energy": {"total", "total_increasing"},
    "battery": {"measurement"},
    "monetary": {"total"},
    "enum": set(),
}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
BINARY_SENSOR_CLASSES = {"battery", "battery_charging", "connectivity", "plug", "power"}
BINARY_SENSOR_CLASSES |= {"problem", "running", "safety", "update"}
NUMBER_UNITS = {"power": SENSOR_UNITS["power"], "battery": {"%"}}

COMMON_KEYS = {
    "name", "unique_id", "default_entity_id", "object_id", "device", "origin", "availability",
    "availability_topic", "availability_mode", "availability_template", "payload_available",
    "payload_not_available", "entity_category", "enabled_by_default", "icon", "encoding",
    "json_attributes_topic", "json_attributes_template", "qos", "entity_picture",
}  # fmt: skip
ALLOWED_KEYS = {
    "sensor": COMMON_KEYS | {
        "state_topic", "value_template", "unit_of_measurement", "device_class", "state_class",
        "options", "expire_after", "force_update", "last_reset_value_template",
        "suggested_display_precision",
    },
    "binary_sensor": COMMON_KEYS | {
        "state_topic", "value_template", "device_class", "payload_on", "payload_off",
        "expire_after", "force_update", "off_delay",
    },
    "number": COMMON_KEYS | {
        "command_topic", "command_template", "state_topic", "value_template", "min", "max",
        "step", "mode", "unit_of_measurement", "device_class", "optimistic", "payload_reset",
        "retain",
    },
    "select": COMMON_KEYS | {
        "command_topic", "command_template", "state_topic", "value_template", "options",
        "optimistic", "retain",
    },
}  # fmt: skip
REQUIRED_KEYS = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "number": {"command_topic"},
    "select": {"command_topic", "options"},
}
DEVICE_KEYS = {"identifiers", "connections", "name", "manufacturer", "model", "model_id"}
DEVICE_KEYS |= {"sw_version", "hw_version", "serial_number", "suggested_area", "via_device"}
DEVICE_KEYS |= {"configuration_url"}
TOPIC = re.compile(rf"^{PREFIX}/(sensor|binary_sensor|number|select)/([\w-]+)/([\w-]+)/config$")
ENTITY_ID = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")

ENV = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)


def check_config(topic: str, config: Mapping[str, Any]) -> list[str]:
    """Every way ``config`` (published on ``topic``) breaks Home Assistant's rules."""
    bad: list[str] = []
    m = TOPIC.match(topic)
    if m is None:
        return [f"{topic}: not a discovery topic"]
    component = m.group(1)
    extra = set(config) - ALLOWED_KEYS[component]
    if extra:
        bad.append(f"unknown keys {sorted(extra)}")
    missing = (REQUIRED_KEYS[component] | {"unique_id", "name", "device"}) - set(config)
    if missing:
        bad.append(f"missing {sorted(missing)}")
    device = config.get("device", {})
    if not (device.get("identifiers") or device.get("connections")):
        bad.append("device without identifiers")
    if set(device) - DEVICE_KEYS:
        bad.append(f"unknown device keys {sorted(set(device) - DEVICE_KEYS)}")
    entity_id = config.get("default_entity_id", f"{component}.x")
    domain, _, rest = entity_id.partition(".")
    if domain != component or not ENTITY_ID.match(rest):
        bad.append(f"invalid entity id {entity_id!r}")
    if "availability" in config:
        if "availability_topic" in config:
            bad.append("availability and availability_topic together")
        if not all(isinstance(a, dict) and a.get("topic") for a in config["availability"]):
            bad.append("an availability entry without a topic")
    if config.get("availability_mode", "latest") not in ("all", "any", "latest"):
        bad.append("invalid availability_mode")
    if config.get("entity_category", "config") not in ("config", "diagnostic"):
        bad.append("invalid entity_category")
    if "json_attributes_template" in config and "json_attributes_topic" not in config:
        bad.append("json_attributes_template without json_attributes_topic")
    bad += _component_rules(component, config)
    return [f"{topic}: {b}" for b in bad]


def _component_rules(component: str, config: Mapping[str, Any]) -> list[str]:
    bad = []
    cls = config.get("device_class")
    unit = config.get("unit_of_measurement")
    state_class = config.get("state_class")
    if component == "sensor":
        if state_class is not None and state_class not in STATE_CLASSES:
            bad.append(f"invalid state_class {state_class!r}")
        if cls == "monetary":
            if unit is not None and not re.fullmatch(r"[A-Z]{3}", unit):
                bad.append(f"monetary unit {unit!r} is not an ISO 4217 code")
        elif cls is not None:
            if cls not in SENSOR_UNITS:
                bad.append(f"device_class {cls!r} not in the encoded table")
            elif unit not in SENSOR_UNITS[cls]:
                bad.append(f"unit {unit!r} invalid for device_class {cls!r}")
        allowed = SENSOR_STATE_CLASSES.get(cls or "", set())
        if cls is not None and state_class is not None and state_class not in allowed:
            bad.append(f"state_class {state_class!r} invalid for device_class {cls!r}")
        if cls == "enum" and not config.get("options"):
            bad.append("enum sensor without options")
        if "options" in config and cls != "enum":
            bad.append("options on a sensor that is not an enum")
    if component == "binary_sensor" and cls is not None and cls not in BINARY_SENSOR_CLASSES:
        bad.append(f"invalid binary_sensor device_class {cls!r}")
    if component == "number":
        if not config.get("min", 1) < config.get("max", 100):
            bad.append("min not below max")
        if not config.get("step", 1) > 0:
            bad.append("step not > 0")
        if config.get("mode", "auto") not in ("auto", "box", "slider"):
            bad.append("invalid number mode")
        if cls is not None and unit not in NUMBER_UNITS.get(cls, set()):
            bad.append(f"unit {unit!r} invalid for number device_class {cls!r}")
    if component == "select" and not (
        isinstance(config.get("options"), list) and config["options"]
    ):
        bad.append("select without options")
    return bad


def render(template: str, payload: bytes) -> str:
    """A value template rendered on a payload as Home Assistant renders it."""
    return ENV.from_string(template).render(value_json=json.loads(payload), value=payload)


def available(config: Mapping[str, Any], retained: Mapping[str, bytes]) -> bool | None:
    """Home Assistant's availability of an entity from the retained payloads (None: unknown,
    no payload yet on a topic)."""
    entries = config.get("availability") or [
        {
            "topic": config["availability_topic"],
            "payload_available": config.get("payload_available", "online"),
            "payload_not_available": config.get("payload_not_available", "offline"),
        }
    ]
    results = []
    for a in entries:
        payload = retained.get(a["topic"])
        if payload is None:
            return None
        value = render(a["value_template"], payload) if "value_template" in a else payload.decode()
        if value == a.get("payload_available", "online"):
            results.append(True)
        elif value == a.get("payload_not_available", "offline"):
            results.append(False)
    mode = config.get("availability_mode", "latest")
    return all(results) if mode == "all" else any(results)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture
async def watcher(broker: Mosquitto) -> AsyncIterator[Watcher]:
    async with Watcher(broker.host, broker.port, [f"{BASE}/#", f"{PREFIX}/#"]) as w:
        yield w


async def retained(broker: Mosquitto, pattern: str, *, settle_s: float = 0.5) -> dict[str, bytes]:
    """The broker's retained store under ``pattern`` (what a client starting now receives)."""
    async with Watcher(broker.host, broker.port, [pattern]) as w:
        await asyncio.sleep(settle_s)
        return {m.topic: m.payload for m in w.messages if m.retain and m.payload}


def with_unplugged_camper(ev: CycleCompleted) -> CycleCompleted:
    """``ev`` plus a portable unit that does not answer (unplugged): no valid reading."""
    mono = ev.snapshot.mono
    missing = Reading.bad("ratio", mono, Quality.MISSING, "no answer")
    first = next(iter(ev.snapshot.batteries.values()))
    camp = dataclasses.replace(
        first,
        device_id="camp1",
        device_class=DeviceClass.PORTABLE,
        available=False,
        soc=missing,
        power_w=Reading.bad("W", mono, Quality.MISSING, "no answer"),
        limits=LiveLimits(0.0, 0.0),
        capacity_wh=2000.0,
    )
    batteries = {**ev.snapshot.batteries, "camp1": camp}
    record = DeviceRecord(
        device_id="camp1",
        device_class=DeviceClass.PORTABLE,
        state=ev.device_states["bess1"],
        reason="no answer",
        limits=DeviceLimits(0.1, 0.95, 1200.0, 1800.0),
        requested_w=0.0,
        setpoint_w=0.0,
        guard_reasons=(),
        write=WriteOutcome(WriteStatus.SKIPPED),
        setpoint_age_s=None,
        charged_wh=120.0,
        discharged_wh=80.0,
    )
    return dataclasses.replace(
        ev,
        snapshot=dataclasses.replace(ev.snapshot, batteries=batteries),
        device_states={**ev.device_states, "camp1": ev.device_states["bess1"]},
        devices={**ev.devices, "camp1": record},
    )


@contextlib.asynccontextmanager
async def published_site(
    broker: Mosquitto, watcher: Watcher, ev: CycleCompleted
) -> AsyncIterator[None]:
    """A running bridge, once the discovery of every unit of ``ev`` is retained."""
    bus = EventBus()
    cfg = mqtt_config(broker.port, ha_discovery=True, allow_anonymous_control=True)
    async with MqttBridge(cfg, SITE, bus, RecordingTarget(), RealClock(), currency="CNY"):
        bus.publish(ev)
        for d in ev.snapshot.batteries:
            await watcher.wait_for(f"{PREFIX}/number/{NODE}/{d}_manual_setpoint/config")
            await watcher.wait_for(f"{BASE}/device/{d}/state")
        await watcher.wait_for(f"{BASE}/plan")
        yield


# --- tests -----------------------------------------------------------------------------------


async def test_every_discovery_payload_follows_home_assistants_rules(
    broker: Mosquitto, watcher: Watcher
) -> None:
    async with published_site(broker, watcher, with_unplugged_camper(make_cycle(3))):
        configs = await retained(broker, f"{PREFIX}/#")
        payloads = await retained(broker, f"{BASE}/#")
    assert len(configs) == 15 + 3 * 7  # the site's entities and 7 per unit
    problems = []
    unique_ids: set[str] = set()
    identifiers: set[str] = set()
    parsed = {t: json.loads(b) for t, b in configs.items()}
    for config in parsed.values():
        identifiers.update(config["device"]["identifiers"])
    for topic, config in parsed.items():
        problems += check_config(topic, config)
        assert config["unique_id"] not in unique_ids, config["unique_id"]
        unique_ids.add(config["unique_id"])
        via = config["device"].get("via_device")
        if via is not None and via not in identifiers:
            problems.append(f"{topic}: via_device {via!r} names no device")
        # Every template renders on the payload really retained on its topic.
        for key, topic_key in (
            ("value_template", "state_topic"),
            ("json_attributes_template", "json_attributes_topic"),
        ):
            if key in config:
                out = render(config[key], payloads[config[topic_key]])
                if key == "json_attributes_template":
                    assert isinstance(json.loads(out), dict), topic
                elif config.get("state_class") and out != "None":
                    float(out)  # a sensor with a state class must be numeric (or unknown)
        if "options" in config and config.get("device_class") == "enum":
            assert (
                render(config["value_template"], payloads[config["state_topic"]])
                in (config["options"])
            )
    assert problems == []
    # The table is applied, not vacuous: a broken config is refused.
    energy = parsed[f"{PREFIX}/sensor/{NODE}/bess1_charged_energy/config"]
    assert energy["state_class"] == "total_increasing"
    assert energy["unit_of_measurement"] == "kWh"
    assert check_config("t", energy) != []  # not a discovery topic
    wrong = {**energy, "unit_of_measurement": "W"}
    assert check_config(f"{PREFIX}/sensor/{NODE}/x/config", wrong) != []
    wrong = {**energy, "state_class": "measurement"}
    assert check_config(f"{PREFIX}/sensor/{NODE}/x/config", wrong) != []


async def test_an_unplugged_portable_unit_is_unavailable_not_unknown(
    broker: Mosquitto, watcher: Watcher
) -> None:
    async with published_site(broker, watcher, with_unplugged_camper(make_cycle(3))):
        configs = {t: json.loads(b) for t, b in (await retained(broker, f"{PREFIX}/#")).items()}
        payloads = await retained(broker, f"{BASE}/#")
    assert payloads[f"{BASE}/status"] == b"online"
    camp = {t: c for t, c in configs.items() if f"/{NODE}/camp1_" in t}
    others = {t: c for t, c in configs.items() if f"/{NODE}/bess1_" in t}
    assert len(camp) == len(others) >= 7
    for config in camp.values():
        assert available(config, payloads) is False, config["unique_id"]
    for config in others.values():
        assert available(config, payloads) is True, config["unique_id"]
    # Its SoC alone would read "unknown" (None); availability makes it "unavailable".
    soc = camp[f"{PREFIX}/sensor/{NODE}/camp1_soc/config"]
    assert render(soc["value_template"], payloads[soc["state_topic"]]) == "None"
    # Its energy counters are still there for when it comes back (durable, kWh).
    charged = camp[f"{PREFIX}/sensor/{NODE}/camp1_charged_energy/config"]
    assert render(charged["value_template"], payloads[charged["state_topic"]]) == "0.12"
    # When essd itself is offline, every entity is unavailable.
    offline = {**payloads, f"{BASE}/status": b"offline"}
    assert all(available(c, offline) is False for c in configs.values())


async def test_a_removed_unit_and_a_stale_config_are_cleared(
    broker: Mosquitto, watcher: Watcher
) -> None:
    stale = f"{PREFIX}/sensor/{NODE}/old9_power/config"
    foreign = f"{PREFIX}/sensor/other_node/old9_power/config"
    await watcher.publish(stale, b'{"name": "from an earlier run"}', retain=True)
    await watcher.publish(foreign, b'{"name": "not essd"}', retain=True)
    bus = EventBus()
    cfg = mqtt_config(broker.port, ha_discovery=True, allow_anonymous_control=True)
    async with MqttBridge(cfg, SITE, bus, RecordingTarget(), RealClock(), currency="CNY"):
        bus.publish(make_cycle(1))
        await watcher.wait_for(stale, lambda m: m.payload == b"")
        await watcher.wait_for(f"{PREFIX}/sensor/{NODE}/home2_power/config")
        await watcher.wait_for(f"{PREFIX}/number/{NODE}/home2_manual_setpoint/config")
        n = len(watcher.messages)
        bus.publish(make_cycle(2, devices=("bess1",)))

        def home2_cleared() -> bool:
            last = {
                m.topic: m.payload for m in watcher.messages[n:] if f"/{NODE}/home2_" in m.topic
            }
            return len(last) == 7 and all(p == b"" for p in last.values())

        await watcher.wait_until(home2_cleared)
    left = await retained(broker, f"{PREFIX}/#")
    assert not [t for t in left if "/home2_" in t or "/old9_" in t.replace(foreign, "")]
    assert foreign in left  # another node's config is not essd's to clear
    assert f"{PREFIX}/sensor/{NODE}/bess1_power/config" in left


async def test_the_manual_setpoint_goes_through_the_real_command_path(
    broker: Mosquitto, watcher: Watcher
) -> None:
    settings = Settings(
        site={"id": SITE, "timezone": "UTC", "grid_import_limit_w": 9000, "grid_export_limit_w": 0},
        tariff={"currency": "EUR", "import_price_per_kwh": 0.3},
        devices=[
            {
                "id": "inv",
                "profile": "household-hybrid-forcible",  # 5000 W each way
                "transport": {"kind": "tcp", "host": "127.0.0.1", "port": 1, "unit": 1},
            }
        ],
        metrics={"enabled": False},
    )
    clock = SimClock(T0)
    pool = EndpointPool(clock=clock)
    bus = EventBus()
    cfg = mqtt_config(broker.port, ha_discovery=True, allow_anonymous_control=True)
    try:
        controller = build_controller(settings, clock=clock, bus=bus, pool=pool)
        async with MqttBridge(cfg, SITE, bus, controller, clock, currency="EUR"):
            bus.publish(make_cycle(1, devices=("inv",)))
            number = (
                await watcher.wait_for(f"{PREFIX}/number/{NODE}/inv_manual_setpoint/config")
            ).json()
            select = (await watcher.wait_for(f"{PREFIX}/select/{NODE}/mode/config")).json()

            async def choose(config: dict[str, Any], value: object) -> dict[str, Any]:
                n = len(watcher.messages)
                command = ENV.from_string(config["command_template"]).render(value=value)
                await watcher.publish(config["command_topic"], command)
                name = config["command_topic"].rsplit("/", 1)[-1]
                return (await watcher.wait_for(f"{BASE}/cmd/{name}/result", after=n)).json()

            refused = await choose(number, 2500)
            assert refused["ok"] is False
            assert refused["error"].startswith("mode: ")  # auto mode: no setpoint
            assert (await choose(select, "manual"))["ok"] is True
            assert (await choose(number, -2500))["ok"] is True
            beyond = await choose(number, 6000)
            assert beyond == {"ok": False, "error": "power_w: beyond inv's limit 5000 W"}
    finally:
        await pool.close()
    held = controller._manual["inv"]
    assert held.power_w == -2500.0
    assert held.expires_at == T0 + cfg.ha_setpoint_ttl_s
