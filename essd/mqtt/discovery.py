"""Home Assistant MQTT discovery: one retained config message per entity, templated on the
retained ``state``, ``plan`` and ``device/<id>/state`` payloads. Optional (``mqtt.ha_discovery``).

Devices in Home Assistant: one for the site (``essd <site>``: SoC, grid, battery totals, cost,
savings, the plan with its forecast as attributes, mode and reserve) and one per storage unit,
linked to the site (``via_device``): power, SoC, charged and discharged energy (kWh,
``total_increasing``), state (an ``enum``), alarm (``problem``), and a manual setpoint
``number`` that sends ``cmd/setpoint`` with an expiry (the command path refuses it outside
manual mode and beyond the unit's limits, as for any other sender).

Availability: site entities follow ``status``; a unit's entities also follow its own device
payload (``available``), so an unplugged portable unit is *unavailable* in Home Assistant, not
*unknown*. :class:`DiscoveryPublisher` clears (empty retained config) the entities of a unit
that is gone, whether it left during this run or before it (it reads back the configs retained
under this site's node id when it connects).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, get_args

from essd import __version__
from essd.commands import MAX_COMMAND_POWER_W, Mode
from essd.domain import DeviceState
from essd.events import CycleCompleted
from essd.mqtt.topics import Topics

#: How long a setpoint chosen in Home Assistant holds before the unit idles again, s.
DEFAULT_SETPOINT_TTL_S = 3600.0


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """A storage unit as discovery describes it: id, class and its power limits (W)."""

    id: str
    device_class: str = "battery"
    max_charge_w: float = MAX_COMMAND_POWER_W
    max_discharge_w: float = MAX_COMMAND_POWER_W


def units_of(cycle: CycleCompleted) -> tuple[UnitInfo, ...]:
    """The storage units of a cycle (not the meter), with the limits the guard knew."""
    out = []
    for d, b in sorted(cycle.snapshot.batteries.items()):
        rec = cycle.devices.get(d)
        lim = rec.limits if rec is not None and rec.limits is not None else b.limits
        charge = lim.max_charge_w if lim is not None and lim.max_charge_w > 0 else None
        dis = lim.max_discharge_w if lim is not None and lim.max_discharge_w > 0 else None
        out.append(
            UnitInfo(
                d, b.device_class.value, charge or MAX_COMMAND_POWER_W, dis or MAX_COMMAND_POWER_W
            )
        )
    return tuple(out)


def _slug(text: str) -> str:
    """An entity id part: lower case letters, digits and single inner underscores."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9_]", "_", text.lower())).strip("_")


def _val(field: str, scale: str = "") -> str:
    # HA's MQTT sensor treats the literal "None" as unknown.
    value = f"(value_json.{field}{scale})"
    return f"{{{{ {value} | round(3) if value_json.{field} is not none else None }}}}"


def _pct(field: str) -> str:
    return (
        f"{{{{ (value_json.{field} * 100) | round(1) "
        f"if value_json.{field} is not none else None }}}}"
    )


_POWER = {"unit_of_measurement": "W", "device_class": "power", "state_class": "measurement"}
# Durable totals that only grow: HA's energy dashboard books them as meter readings.
_ENERGY_WH = {"unit_of_measurement": "Wh", "device_class": "energy"}
_ENERGY_WH |= {"state_class": "total_increasing"}
_ENERGY_KWH = {**_ENERGY_WH, "unit_of_measurement": "kWh"}
_SOC = {"unit_of_measurement": "%", "device_class": "battery", "state_class": "measurement"}
_AVAILABLE = "{{ 'online' if value_json.available else 'offline' }}"
_PLAN_ATTRIBUTES = (
    "{{ {'start': value_json.created_at_iso, 'step_s': value_json.step_s, "
    "'battery_w': value_json.battery_w, 'grid_w': value_json.grid_w, "
    "'soc': value_json.soc, 'import_price': value_json.import_price, "
    "'export_price': value_json.export_price, 'load_w': value_json.forecast_load_w, "
    "'pv_w': value_json.forecast_pv_w, 'carbon_g_per_kwh': "
    "value_json.forecast_carbon_g_per_kwh, 'rung': value_json.fallback_rung_name} | tojson }}"
)


def discovery_messages(
    topics: Topics,
    units: Iterable[str | UnitInfo],
    *,
    currency: str = "",
    version: str = __version__,
    pv_measured: bool = False,
    setpoint_ttl_s: float = DEFAULT_SETPOINT_TTL_S,
    charger_ids: Iterable[str] = (),
) -> list[tuple[str, bytes]]:
    """Home Assistant MQTT discovery configs (topic, JSON) for the site, its units and its EV
    chargers (a session's energy and departure, sent as ``cmd/session``)."""
    node = topics.node_id
    site_device = {
        "identifiers": [node],
        "name": f"essd {topics.site_id}",
        "manufacturer": "essd",
        "model": "energy storage dispatch",
        "sw_version": version,
    }
    origin = {"name": "essd", "sw_version": version}
    out: list[tuple[str, bytes]] = []

    def entity(component: str, object_id: str, name: str, **extra: Any) -> None:
        device = extra.pop("device", site_device)
        body: dict[str, Any] = {
            "name": name,
            "unique_id": f"{node}_{object_id}",
            # HA 2025.10 replaced "object_id" with this (object_id stops working in 2026.4).
            "default_entity_id": f"{component}.{_slug(f'{node}_{object_id}')}",
            "device": device,
            "origin": origin,
        }
        if "availability" not in extra:
            body |= {
                "availability_topic": topics.status,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        body |= extra
        out.append((topics.discovery(component, object_id), json.dumps(body).encode()))

    site = {"state_topic": topics.state}
    money: dict[str, Any] = {"state_class": "total"}
    if currency:
        money |= {"unit_of_measurement": currency, "device_class": "monetary"}
    entity("sensor", "soc", "State of charge", value_template=_pct("soc"), **site, **_SOC)
    entity(
        "sensor", "grid_power", "Grid power", value_template=_val("grid_power_w"), **site, **_POWER
    )
    entity(
        "sensor", "battery_power", "Battery power", value_template=_val("battery_power_w"),
        **site, **_POWER,
    )  # fmt: skip
    entity("sensor", "net_load", "Net load", value_template=_val("net_load_w"), **site, **_POWER)
    if pv_measured:
        entity(
            "sensor", "pv_power", "PV power", value_template=_val("pv_power_w"), **site, **_POWER
        )
        entity(
            "sensor", "pv_energy", "PV energy", value_template=_val("totals.pv_wh"),
            **site, **_ENERGY_WH,
        )  # fmt: skip
    entity("sensor", "cost", "Energy cost", value_template=_val("totals.cost"), **site, **money)
    entity(
        "sensor", "savings", "Battery savings", value_template=_val("totals.savings"),
        **site, **money,
    )  # fmt: skip
    for key, name in (
        ("imported", "Imported energy"),
        ("exported", "Exported energy"),
        ("battery_charged", "Battery charged energy"),
        ("battery_discharged", "Battery discharged energy"),
    ):
        entity(
            "sensor", f"{key}_energy", name, value_template=_val(f"totals.{key}_wh"),
            **site, **_ENERGY_WH,
        )  # fmt: skip
    entity(
        "sensor", "billing_peak", "Billing peak import", value_template=_val("billing_peak_w"),
        **site, **_POWER,
    )  # fmt: skip
    entity(
        "sensor", "fallback_rung", "Fallback rung", entity_category="diagnostic",
        value_template="{{ value_json.fallback_rung_name }}", **site,
    )  # fmt: skip
    entity(
        "sensor", "plan", "Planned battery power", state_topic=topics.plan,
        value_template="{{ value_json.battery_w[0] | round(1) if value_json.battery_w else None }}",
        json_attributes_topic=topics.plan, json_attributes_template=_PLAN_ATTRIBUTES, **_POWER,
    )  # fmt: skip
    entity(
        "select", "mode", "Mode", value_template="{{ value_json.mode }}",
        command_topic=topics.command("mode"), command_template='{"mode": "{{ value }}"}',
        options=list(get_args(Mode)), **site,
    )  # fmt: skip
    entity(
        "number", "reserve", "Reserve", command_topic=topics.command("reserve"),
        value_template="{{ (value_json.reserve_soc * 100) | round(1) }}",
        command_template='{"reserve_soc": {{ (value | float / 100) | round(4) }}}',
        min=0, max=100, step=1, unit_of_measurement="%", mode="box", **site,
    )  # fmt: skip
    for unit in sorted((u if isinstance(u, UnitInfo) else UnitInfo(u) for u in units), key=str):
        _unit_entities(entity, topics, unit, version=version, ttl_s=setpoint_ttl_s)
    for charger in sorted(charger_ids):
        _charger_entities(entity, topics, charger)
    return out


def _charger_entities(entity: Any, topics: Topics, charger: str) -> None:
    """A charger's session request as HA entities: energy wanted (kWh) and departure."""
    key = re.sub(r"[^a-z0-9_]", "_", charger.lower())
    common = {"command_topic": topics.command("session")}
    entity(
        "number", f"{key}_session_energy", f"{charger} energy wanted",
        command_template=(
            f'{{"charger": "{charger}", "energy_wh": {{{{ (value | float * 1000) | round(0) }}}}}}'
        ),
        min=0, max=200, step=1, unit_of_measurement="kWh", mode="box", **common,
    )  # fmt: skip
    entity(
        "text", f"{key}_session_departure", f"{charger} departure",
        command_template=f'{{"charger": "{charger}", "departure": "{{{{ value }}}}"}}',
        pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?([+-]\d{2}:\d{2}|Z)$", **common,
    )  # fmt: skip


def _unit_entities(entity: Any, topics: Topics, u: UnitInfo, *, version: str, ttl_s: float) -> None:
    node = topics.node_id
    d = u.id
    dev = {
        "state_topic": topics.device(d),
        "device": {
            "identifiers": [f"{node}_{d}"],
            "name": f"{topics.site_id} {d}",
            "manufacturer": "essd",
            "model": f"{u.device_class} storage unit",
            "sw_version": version,
            "via_device": node,
        },
        # Unavailable (not unknown) while essd is offline or the unit does not answer.
        "availability": [
            {"topic": topics.status},
            {"topic": topics.device(d), "value_template": _AVAILABLE},
        ],
        "availability_mode": "all",
    }
    entity("sensor", f"{d}_power", f"{d} power", value_template=_val("power_w"), **dev, **_POWER)
    entity("sensor", f"{d}_soc", f"{d} state of charge", value_template=_pct("soc"), **dev, **_SOC)
    for key, name in (("charged", "charged energy"), ("discharged", "discharged energy")):
        entity(
            "sensor", f"{d}_{key}_energy", f"{d} {name}",
            value_template=_val(f"{key}_wh", " / 1000"), **dev, **_ENERGY_KWH,
        )  # fmt: skip
    entity(
        "sensor", f"{d}_state", f"{d} state", device_class="enum",
        options=[s.value for s in DeviceState], value_template="{{ value_json.state }}",
        json_attributes_topic=topics.device(d),
        json_attributes_template="{{ {'reason': value_json.reason} | tojson }}", **dev,
    )  # fmt: skip
    entity(
        "binary_sensor", f"{d}_alarm", f"{d} alarm", device_class="problem",
        value_template="{{ 'ON' if value_json.alarms else 'OFF' }}",
        json_attributes_topic=topics.device(d),
        json_attributes_template="{{ {'alarms': value_json.alarms} | tojson }}", **dev,
    )  # fmt: skip
    entity(
        "number", f"{d}_manual_setpoint", f"{d} manual setpoint",
        command_topic=topics.command("setpoint"),
        command_template=(
            f'{{"device": "{d}", "power_w": {{{{ value | float }}}}, "ttl_s": {ttl_s:g}}}'
        ),
        value_template="{{ value_json.setpoint_w | float(0) }}",
        min=-u.max_charge_w, max=u.max_discharge_w, step=100, mode="box",
        unit_of_measurement="W", device_class="power", **dev,
    )  # fmt: skip


class DiscoveryPublisher:
    """Which discovery configs to (re)publish, and which retained ones to clear.

    Feed it every retained config seen under this site's node (:meth:`seen`, from a
    subscription to :attr:`filter`) and ask :meth:`messages` after each cycle.
    """

    def __init__(
        self,
        topics: Topics,
        *,
        currency: str = "",
        setpoint_ttl_s: float = DEFAULT_SETPOINT_TTL_S,
        charger_ids: tuple[str, ...] = (),
    ) -> None:
        self.topics = topics
        self._charger_ids = charger_ids
        self._currency = currency
        self._ttl_s = setpoint_ttl_s
        self._key: tuple[Any, ...] | None = None
        self._current: set[str] = set()
        self._stale: set[str] = set()

    @property
    def filter(self) -> str:
        """The subscription that reads back this site's retained discovery configs."""
        return f"{self.topics.ha_prefix}/+/{self.topics.node_id}/+/config"

    def seen(self, topic: str, payload: bytes) -> bool:
        """A config under this node arrived; True when it is not (or no longer) essd's."""
        if not payload:
            self._stale.discard(topic)
            return False
        if topic in self._current:
            return False
        self._stale.add(topic)
        return True

    def invalidate(self) -> None:
        """Publish everything again with the next :meth:`messages` (new session, HA birth)."""
        self._key = None

    def messages(self, cycle: CycleCompleted | None) -> list[tuple[str, bytes]]:
        """Configs to publish now (all of them when something changed) and empty retained
        payloads for configs that are no longer essd's."""
        units = units_of(cycle) if cycle is not None else ()
        pv = cycle is not None and cycle.pv_power_w is not None
        key = (tuple(u.id for u in units), pv)
        out: list[tuple[str, bytes]] = []
        if key != self._key:
            self._key = key
            out = discovery_messages(
                self.topics, units, currency=self._currency, pv_measured=pv,
                setpoint_ttl_s=self._ttl_s, charger_ids=self._charger_ids,
            )  # fmt: skip
            gone = self._current - {t for t, _ in out}
            self._current = {t for t, _ in out}
            self._stale |= gone
        if cycle is not None:  # only once the site's units are known
            self._stale -= self._current
            out += [(t, b"") for t in sorted(self._stale)]
            self._stale.clear()
        return out
