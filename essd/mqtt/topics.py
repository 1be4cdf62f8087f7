"""The MQTT topic names of one site, under ``<base_topic>/<site_id>/`` (``docs/mqtt.md``)."""

from __future__ import annotations

from dataclasses import dataclass

from essd.config import MqttConfig


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one site, derived from ``base_topic`` and the site id."""

    base: str
    ha_prefix: str
    site_id: str

    @classmethod
    def of(cls, config: MqttConfig, site_id: str) -> Topics:
        """The topics for ``site_id`` under the configured base."""
        return cls(f"{config.base_topic.rstrip('/')}/{site_id}", config.ha_prefix, site_id)

    @property
    def status(self) -> str:
        """``online``/``offline``, retained; the last will."""
        return f"{self.base}/status"

    @property
    def state(self) -> str:
        """Retained site state."""
        return f"{self.base}/state"

    @property
    def plan(self) -> str:
        """Retained dispatch plan."""
        return f"{self.base}/plan"

    def device(self, device_id: str) -> str:
        """Retained state of one device."""
        return f"{self.base}/device/{device_id}/state"

    def command(self, name: str) -> str:
        """Where command ``name`` is sent."""
        return f"{self.base}/cmd/{name}"

    def result(self, name: str) -> str:
        """Where the result of command ``name`` is published (never retained)."""
        return f"{self.base}/cmd/{name}/result"

    @property
    def commands(self) -> str:
        """The subscription matching every command topic (and not their results)."""
        return f"{self.base}/cmd/+"

    @property
    def ha_status(self) -> str:
        """Home Assistant's birth/last-will topic."""
        return f"{self.ha_prefix}/status"

    @property
    def node_id(self) -> str:
        """Home Assistant node id of this site."""
        return f"essd_{self.site_id}".replace("-", "_")

    def discovery(self, component: str, object_id: str) -> str:
        """Home Assistant discovery config topic of one entity."""
        return f"{self.ha_prefix}/{component}/{self.node_id}/{object_id}/config"
