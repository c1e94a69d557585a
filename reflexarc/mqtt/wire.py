"""The MQTT wire codec reflexarc needs beyond paho: PUBLISH properties packed and decoded directly.

paho's generic property encoder and decoder cost about as much as the rest of
a QoS 1 publish for a CloudEvent's dozen user properties. These functions do
the same encoding byte for byte (checked against paho's own in
``tests/unit/kernel/test_mqtt_wire.py``) for the two properties CloudEvents
use, content type and user properties; anything else goes through paho.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class MqttMessage:
    """A received message."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool = False
    dup: bool = False
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None


# ---- MQTT 5 PUBLISH properties, packed directly --------------------------------------
_U16 = struct.Struct("!H").pack
# b"\x26" + length + key for user-property keys seen before (CloudEvents reuse a dozen names).
_KEY_HEADS: dict[str, bytes] = {}


def pack_publish_properties(user_properties: Sequence[tuple[str, str]], content_type: str | None) -> bytes:
    """The MQTT 5 PUBLISH property block (content type + user properties), byte for byte as paho packs it."""
    body = bytearray()
    try:
        if content_type:
            raw = content_type.encode()
            body += b"\x03"
            body += _U16(len(raw))
            body += raw
        heads = _KEY_HEADS
        for key, value in user_properties:
            head = heads.get(key)
            if head is None:
                raw = key.encode()
                head = b"\x26" + _U16(len(raw)) + raw
                if len(heads) < 1024:
                    heads[key] = head
            raw = value.encode()
            body += head
            body += _U16(len(raw))
            body += raw
    except struct.error:
        too_long = [
            s for s in (content_type or "", *(x for kv in user_properties for x in kv)) if len(s.encode()) > 65535
        ]
        raise ValueError(f"MQTT string longer than 65535 bytes: {too_long[0][:40]!r}...") from None
    n = len(body)
    out = bytearray()
    while True:  # the block's length as a variable byte integer
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            break
    out += body
    return bytes(out)


class PackedProperties:
    """Pre-packed PUBLISH properties: paho only calls ``pack()`` on what it is given.

    paho's generic ``Properties.pack`` costs about as much as the rest of a
    QoS 1 publish for a CloudEvent's dozen user properties; this does the same
    encoding directly (paho calls ``pack()`` again when it resends after a
    reconnect, which returns the same bytes).
    """

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    def pack(self) -> bytes:
        """The encoded property block."""
        return self._packed

    def __str__(self) -> str:
        return f"[{len(self._packed)} bytes of properties]"


def _decode_publish(header: int, packet: bytes | bytearray, v5: bool) -> MqttMessage | None:
    """Decode a QoS 0/1 PUBLISH body straight into an :class:`MqttMessage`.

    paho's generic property decoder costs ~150 µs for a CloudEvent's dozen
    user properties, most of a received message's cost. This reads the two
    properties CloudEvents use (content type, user properties) directly and
    returns None for anything else (other properties, bad UTF-8, malformed
    lengths), which then goes through paho's own decoder and its errors.
    """
    try:
        packet = bytes(packet)  # bytes index and slice faster than paho's bytearray
        n = len(packet)
        tlen = (packet[0] << 8) | packet[1]
        pos = 2 + tlen
        if pos > n or (tlen == 0 and not v5):
            return None
        topic = packet[2:pos].decode()
        qos = (header & 0x06) >> 1
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        user: list[tuple[str, str]] = []
        ctype: str | None = None
        if v5:
            byte = packet[pos]  # property length: a variable byte integer
            pos += 1
            plen = byte & 0x7F
            shift = 7
            while byte & 0x80:
                if shift > 21:
                    return None
                byte = packet[pos]
                pos += 1
                plen |= (byte & 0x7F) << shift
                shift += 7
            end = pos + plen
            if end > n:
                return None
            append = user.append
            while pos < end:
                ident = packet[pos]
                kend = pos + 3 + ((packet[pos + 1] << 8) | packet[pos + 2])
                if ident == 0x26:
                    vend = kend + 2 + ((packet[kend] << 8) | packet[kend + 1])
                    append((packet[pos + 3 : kend].decode(), packet[kend + 2 : vend].decode()))
                    pos = vend
                elif ident == 0x03:
                    ctype = packet[pos + 3 : kend].decode()
                    pos = kend
                else:
                    return None
            if pos != end:  # a length ran past the property block: malformed
                return None
        return MqttMessage(topic, packet[pos:], qos, mid, bool(header & 0x01), bool(header & 0x08), user, ctype)
    except (IndexError, UnicodeDecodeError):
        return None
