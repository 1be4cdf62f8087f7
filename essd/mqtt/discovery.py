"""Home Assistant MQTT discovery: one retained config message per entity, templated on the
retained ``state`` and ``device/<id>/state`` payloads. Optional (``mqtt.ha_discovery``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, get_args

from essd import __version__
from essd.commands import Mode
from essd.mqtt.topics import Topics

__all__ = ["discovery_messages"]


def discovery_messages(
    topics: Topics,
    device_ids: Iterable[str],
    *,
    currency: str = "",
    version: str = __version__,
    charger_ids: Iterable[str] = (),
) -> list[tuple[str, bytes]]:
    """Home Assistant MQTT discovery configs (topic, JSON) for the site, its devices and its
    EV chargers (a session's energy and departure, sent as ``cmd/session``)."""
    device = {
        "identifiers": [topics.node_id],
        "name": f"essd {topics.site_id}",
        "manufacturer": "essd",
        "model": "energy storage dispatch",
        "sw_version": version,
    }
    common: dict[str, Any] = {
        "availability_topic": topics.status,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "essd", "sw_version": version},
    }

    def entity(component: str, object_id: str, name: str, **extra: Any) -> tuple[str, bytes]:
        body = {
            "name": name,
            "unique_id": f"{topics.node_id}_{object_id}",
            # HA 2025.10 replaced "object_id" with this (object_id stops working in 2026.4).
            "default_entity_id": f"{component}.{topics.node_id}_{object_id}",
            **common,
            **extra,
        }
        return topics.discovery(component, object_id), json.dumps(body).encode()

    def pct(field: str) -> str:
        # HA's MQTT sensor treats the literal "None" as unknown.
        return (
            f"{{{{ (value_json.{field} * 100) | round(1) "
            f"if value_json.{field} is not none else None }}}}"
        )

    def val(field: str) -> str:
        return f"{{{{ value_json.{field} if value_json.{field} is not none else None }}}}"

    power = {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement"}
    # The totals are durable and only grow: HA's energy dashboard books them as meter readings.
    energy = {
        "unit_of_measurement": "Wh",
        "device_class": "energy",
        "state_class": "total_increasing",
    }
    money: dict[str, Any] = {"state_class": "total"}
    if currency:
        money |= {"unit_of_measurement": currency, "device_class": "monetary"}
    soc = {"unit_of_measurement": "%", "device_class": "battery", "state_class": "measurement"}
    out = [
        entity(
            "sensor",
            "soc",
            "State of charge",
            state_topic=topics.state,
            value_template=pct("soc"),
            **soc,
        ),
        entity(
            "sensor",
            "grid_power",
            "Grid power",
            state_topic=topics.state,
            value_template=val("grid_power_w"),
            **power,
        ),
        entity(
            "sensor",
            "battery_power",
            "Battery power",
            state_topic=topics.state,
            value_template=val("battery_power_w"),
            **power,
        ),
        entity(
            "sensor",
            "cost",
            "Energy cost",
            state_topic=topics.state,
            value_template=val("totals.cost"),
            **money,
        ),
        entity(
            "sensor",
            "imported_energy",
            "Imported energy",
            state_topic=topics.state,
            value_template=val("totals.imported_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "exported_energy",
            "Exported energy",
            state_topic=topics.state,
            value_template=val("totals.exported_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "battery_charged_energy",
            "Battery charged energy",
            state_topic=topics.state,
            value_template=val("totals.battery_charged_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "battery_discharged_energy",
            "Battery discharged energy",
            state_topic=topics.state,
            value_template=val("totals.battery_discharged_wh"),
            **energy,
        ),
        entity(
            "sensor",
            "fallback_rung",
            "Fallback rung",
            state_topic=topics.state,
            value_template="{{ value_json.fallback_rung_name }}",
            entity_category="diagnostic",
        ),
        entity(
            "select",
            "mode",
            "Mode",
            state_topic=topics.state,
            value_template="{{ value_json.mode }}",
            command_topic=topics.command("mode"),
            command_template='{"mode": "{{ value }}"}',
            options=list(get_args(Mode)),
        ),
        entity(
            "number",
            "reserve",
            "Reserve",
            state_topic=topics.state,
            value_template="{{ (value_json.reserve_soc * 100) | round(1) }}",
            command_topic=topics.command("reserve"),
            command_template='{"reserve_soc": {{ (value | float / 100) | round(4) }}}',
            min=0,
            max=100,
            step=1,
            unit_of_measurement="%",
            mode="box",
        ),
    ]
    for d in sorted(device_ids):
        out.append(
            entity(
                "sensor",
                f"{d}_power",
                f"{d} power",
                state_topic=topics.device(d),
                value_template=val("power_w"),
                **power,
            )
        )
        out.append(
            entity(
                "sensor",
                f"{d}_soc",
                f"{d} state of charge",
                state_topic=topics.device(d),
                value_template=pct("soc"),
                **soc,
            )
        )
    out += [m for c in sorted(charger_ids) for m in _charger_entities(entity, topics, c)]
    return out


def _charger_entities(
    entity: Callable[..., tuple[str, bytes]], topics: Topics, charger: str
) -> list[tuple[str, bytes]]:
    """A charger's session request as HA entities: energy wanted (kWh) and departure."""
    key = re.sub(r"[^a-z0-9_]", "_", charger.lower())
    return [
        entity(
            "number",
            f"{key}_session_energy",
            f"{charger} energy wanted",
            command_topic=topics.command("session"),
            command_template=(
                f'{{"charger": "{charger}", "energy_wh": '
                "{{ (value | float * 1000) | round(0) }}}"
            ),
            min=0,
            max=200,
            step=1,
            unit_of_measurement="kWh",
            mode="box",
        ),
        entity(
            "text",
            f"{key}_session_departure",
            f"{charger} departure",
            command_topic=topics.command("session"),
            command_template=f'{{"charger": "{charger}", "departure": "{{{{ value }}}}"}}',
            pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?([+-]\d{2}:\d{2}|Z)$",
        ),
    ]
