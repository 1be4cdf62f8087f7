"""MQTT: the versioned topic contract (state, plan, devices, commands, Home Assistant discovery).

Topics live under ``<base_topic>/<site_id>/`` (``docs/mqtt.md`` is the contract):

- ``status``: ``online``/``offline``, retained; ``offline`` is also the last will, and a clean
  stop publishes it explicitly (a clean disconnect does not fire the will).
- ``state``: retained JSON :class:`StatePayload` after every cycle.
- ``plan``: retained JSON :class:`PlanPayload` whenever the core produced a new plan.
- ``device/<id>/state``: retained JSON :class:`DeviceStatePayload`.
- ``cmd/<name>``: commands, answered on ``cmd/<name>/result`` with a
  :class:`essd.commands.CommandResult` (exactly one reply per command).

Modules: :mod:`essd.mqtt.payloads` (the JSON payloads), :mod:`essd.mqtt.topics` (topic names),
:mod:`essd.mqtt.discovery` (Home Assistant discovery), :mod:`essd.mqtt.command_rules` (limits and
refusals of commands), :mod:`essd.mqtt.bridge` (the connection: publishing, commands, reconnects).

Sign conventions in every payload: battery W > 0 discharges into the site, < 0 charges; grid
W > 0 imports; SoC as a ratio 0..1; energy Wh.
"""

from essd.mqtt.bridge import MqttBridge, open_bridge
from essd.mqtt.command_rules import REFUSED_ANONYMOUS, command_limits
from essd.mqtt.discovery import discovery_messages
from essd.mqtt.payloads import (
    SCHEMA_VERSION,
    DeviceStatePayload,
    PlanPayload,
    StatePayload,
    build_device_payload,
    build_plan_payload,
    build_state_payload,
)
from essd.mqtt.topics import Topics

__all__ = [
    "REFUSED_ANONYMOUS",
    "SCHEMA_VERSION",
    "DeviceStatePayload",
    "MqttBridge",
    "PlanPayload",
    "StatePayload",
    "Topics",
    "build_device_payload",
    "build_plan_payload",
    "build_state_payload",
    "command_limits",
    "discovery_messages",
    "open_bridge",
]
