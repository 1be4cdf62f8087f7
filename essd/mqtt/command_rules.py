"""What the MQTT bridge checks before a command reaches the daemon: the operator limits, and the
replies to commands it refuses outright (anonymous connection, retained message).
"""

from __future__ import annotations

from essd.commands import CommandLimits
from essd.config import ControlConfig, MqttConfig

#: Reply to a command received while essd holds no credentials (and no opt-in).
REFUSED_ANONYMOUS = (
    "command: refused, essd is connected anonymously (configure username and password or a "
    "TLS client certificate, or set mqtt.allow_anonymous_control)"
)


#: Reply to a retained command.
REFUSED_RETAINED = "retain: retained commands are never applied (publish with retain false)"


#: Commands a ``standby`` makes moot while they wait in the queue.
SUPERSEDED_BY_STANDBY = ("mode", "setpoint")


def command_limits(mqtt: MqttConfig, control: ControlConfig) -> CommandLimits:
    """The limits on operator commands: ``[mqtt]``'s, the reserve floor from ``[control]``."""
    return CommandLimits(
        max_manual_duration_s=mqtt.max_manual_duration_s,
        max_manual_power_w=mqtt.max_manual_power_w,
        min_reserve_soc=(
            control.reserve_soc if mqtt.min_reserve_soc is None else mqtt.min_reserve_soc
        ),
    )
