"""The agent's MQTT connection: the kernel client plus jittered reconnect backoff."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from reflexarc.mqtt import MqttClient

_USER_PROPERTY = b"\x26"
_CONTENT_TYPE = b"\x03"


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 65535:
        raise ValueError(f"MQTT string longer than 65535 bytes: {text[:40]!r}...")
    return len(raw).to_bytes(2, "big") + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pack_publish_properties(user_properties: Sequence[tuple[str, str]], content_type: str | None) -> bytes:
    """The MQTT 5 PUBLISH property block (content type + user properties), as paho would pack it."""
    body = bytearray()
    if content_type:
        body += _CONTENT_TYPE + _utf8(content_type)
    for key, value in user_properties:
        body += _USER_PROPERTY + _utf8(key) + _utf8(value)
    return _varint(len(body)) + bytes(body)


class PackedProperties:
    """Pre-packed PUBLISH properties: paho only calls ``pack()`` on what it is given.

    paho's generic ``Properties.pack`` costs about as much as the rest of a
    QoS 1 publish for a CloudEvent's dozen user properties; this does the same
    encoding directly.
    """

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        """The encoded property block."""
        return self._packed

    def __str__(self) -> str:
        return f"[{len(self._packed)} bytes of properties]"


class EdgeMqttClient(MqttClient):
    """:class:`reflexarc.mqtt.MqttClient` whose reconnects back off exponentially with jitter.

    paho doubles the delay from ``min_delay`` to ``max_delay``; a whole fleet
    whose broker restarts would then reconnect in lock-step. Before each
    reconnect attempt we add a random delay of up to ``jitter`` times the
    current backoff, which spreads the herd.
    """

    def __init__(
        self,
        *args: Any,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        jitter: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._min = reconnect_min_s
        self._max = reconnect_max_s
        self._jitter = jitter
        self._attempts = 0
        self._rng = random.Random()
        self._c.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)  # type: ignore[arg-type]
        self._c.on_pre_connect = self._before_connect

    def _before_connect(self, _client: Any, _userdata: Any) -> None:
        # Runs in paho's network thread before every (re)connect, never on the event loop.
        if self.connected.is_set() or self._attempts == 0:
            self._attempts = 1  # the first connect of the process goes at once
            return
        backoff = min(self._max, self._min * (2 ** min(self._attempts - 1, 20)))
        self._attempts += 1
        if self._jitter:
            time.sleep(self._rng.uniform(0.0, self._jitter * backoff))

    def _properties(  # type: ignore[override]
        self, user_properties: Sequence[tuple[str, str]], content_type: str | None
    ) -> PackedProperties | None:
        if not self.v5 or (not user_properties and not content_type):
            return None
        return PackedProperties(pack_publish_properties(user_properties, content_type))

    def _connected(self, code: int, text: str, session_present: bool) -> None:
        if code == 0:
            self._attempts = 1
        super()._connected(code, text, session_present)
