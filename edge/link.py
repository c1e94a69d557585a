"""The agent's MQTT connection: the kernel client with the agent's reconnect backoff.

Reconnect backoff with jitter and the fast MQTT 5 property packing used to
live here; both are in :mod:`reflexarc.mqtt` now, so every tier gets them.
The names stay importable from here.
"""

from __future__ import annotations

from typing import Any

from reflexarc.mqtt import MqttClient, PackedProperties, pack_publish_properties

__all__ = ["EdgeMqttClient", "PackedProperties", "pack_publish_properties"]


class EdgeMqttClient(MqttClient):
    """:class:`reflexarc.mqtt.MqttClient` with the agent's reconnect settings.

    Lost connections are retried after ``reconnect_min_s``, doubling up to
    ``reconnect_max_s``; each wait adds a random ``0 .. jitter`` times the
    backoff, which spreads a fleet whose broker restarted.
    """

    def __init__(
        self,
        *args: Any,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        jitter: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            reconnect_jitter=jitter,
            **kwargs,
        )
