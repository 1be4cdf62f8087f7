"""What the MQTT bridge checks before a command reaches the daemon: the operator limits, and the
reply to a command it refuses outright on an anonymous connection (the reply to a retained one
is :data:`essd.command_queue.REFUSED_RETAINED`).
"""

from __future__ import annotations

from essd.commands import CommandLimits
from essd.config import ControlConfig, MqttConfig

#: Reply to a command received while essd holds no credentials (and no opt-in).
REFUSED_ANONYMOUS = (
    "command: refused, essd is connected anonymously (configure username and password or a "
    "TLS client certificate, or set mqtt.allow_anonymous_control)"
)


def command_limits(mqtt: MqttConfig, control: ControlConfig) -> CommandLimits:
    """The limits on operator commands: ``[mqtt]``'s, the reserve floor from ``[control]``."""
    return CommandLimits(
        max_manual_duration_s=mqtt.max_manual_duration_s,
        max_manual_power_w=mqtt.max_manual_power_w,
        min_reserve_soc=(
            control.reserve_soc if mqtt.min_reserve_soc is None else mqtt.min_reserve_soc
        ),
    )
