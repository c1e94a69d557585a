"""The kernel MQTT client's wire helpers, checked against paho's own encoders and decoders."""

from __future__ import annotations

import asyncio
import socket
import struct

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from reflexarc.config import MqttSettings
from reflexarc.envelope import Envelope
from reflexarc.mqtt import MqttClient, MqttMessage, PackedProperties, pack_publish_properties
from reflexarc.mqtt._paho import _Conn
from reflexarc.mqtt.wire import _decode_publish

CE_PROPS = Envelope.for_device("io.reflexarc.data", "bl1", "det1", {"v": 1}, subject="s").to_mqtt(binary=True)[1]


def paho_props(user: list[tuple[str, str]], ctype: str | None = None, **other: object) -> Properties:
    """Properties as paho builds them."""
    p = Properties(PacketTypes.PUBLISH)
    if user:
        p.UserProperty = user
    if ctype:
        p.ContentType = ctype
    for name, value in other.items():
        setattr(p, name, value)
    return p


@pytest.mark.parametrize(
    ("user", "ctype"),
    [
        (CE_PROPS, "application/json"),
        ([("ключ", "значение é ü"), ("k", "")], None),
        ([("k", "v" * 300)] * 50, None),  # property block longer than 127 bytes: multi-byte length
        ([], "text/plain"),
    ],
)
def test_packed_publish_properties_are_byte_identical_to_paho(user: list[tuple[str, str]], ctype: str | None) -> None:
    assert pack_publish_properties(user, ctype) == paho_props(user, ctype).pack()
    assert PackedProperties(pack_publish_properties(user, ctype)).pack() == paho_props(user, ctype).pack()


def test_packing_a_string_longer_than_mqtt_allows_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="longer than 65535 bytes"):
        pack_publish_properties([("k", "x" * 70_000)], None)


def publish_body(topic: str, mid: int | None, props: Properties | None, payload: bytes) -> bytearray:
    """A PUBLISH packet after the fixed header, as a broker sends it."""
    raw = topic.encode()
    body = bytearray(struct.pack("!H", len(raw)) + raw)
    if mid is not None:
        body += struct.pack("!H", mid)
    if props is not None:
        body += props.pack()
    return body + payload


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize(("retain", "dup"), [(False, False), (True, True)])
def test_fast_publish_decoder_agrees_with_paho(v5: bool, qos: int, retain: bool, dup: bool) -> None:
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    props = paho_props(CE_PROPS, "application/cloudevents+json") if v5 else None
    body = publish_body("rx/bl1/det1/data/é", 4242 if qos else None, props, b"\x00payload\xff")
    ours = _decode_publish(header, body, v5)
    ref = _packet.decode_publish(header, body, paho.MQTTv5 if v5 else paho.MQTTv311)
    assert ours == MqttMessage(
        ref.topic.decode(),
        bytes(ref.payload),
        ref.qos,
        ref.mid,
        ref.retain,
        ref.dup,
        list(getattr(ref.properties, "UserProperty", [])),
        getattr(ref.properties, "ContentType", None),
    )
    assert isinstance(ours.payload, bytes) and ours.mid == (4242 if qos else 0)


def test_fast_publish_decoder_leaves_everything_else_to_paho() -> None:
    header = 0x32
    # Properties CloudEvents do not use: paho's decoder handles them.
    other = paho_props(CE_PROPS, None, MessageExpiryInterval=30)
    assert _decode_publish(header, publish_body("a/b", 1, other, b"x"), True) is None
    # Invalid UTF-8 in the topic, a truncated packet, an empty topic on MQTT 3.1.1.
    bad = bytearray(b"\x00\x02\xff\xfe\x00\x01\x00")
    assert _decode_publish(header, bad, True) is None
    good = publish_body("a/b", 1, paho_props(CE_PROPS), b"x")
    assert _decode_publish(header, good[:12], True) is None
    assert _decode_publish(0x30, bytearray(b"\x00\x00x"), False) is None


def test_connection_buffers_reads_and_gathers_writes() -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = _Conn(a)
        with pytest.raises(BlockingIOError):
            conn.recv(1)
        b.sendall(b"\x40\x02\x00\x01" * 3)  # three PUBACKs in one segment
        assert conn.recv(1) == b"\x40"
        assert conn.pending() == 11, "one recv() took all three packets"
        assert conn.recv(1) == b"\x02" and conn.recv(2) == b"\x00\x01"
        assert conn.recv(100) == b"\x40\x02\x00\x01" * 2
        assert conn.pending() == 0
        # A packet split across reads: the buffered part, then the rest once it arrives.
        b.sendall(b"\x30\x05ab")
        assert conn.recv(1) == b"\x30" and conn.recv(1) == b"\x05" and conn.recv(5) == b"ab"
        assert conn.pending() == 0
        with pytest.raises(BlockingIOError):
            conn.recv(3)
        assert conn.pending() == 0, "nothing buffered may be claimed while the rest is missing"
        b.sendall(b"cde")
        assert conn.recv(3) == b"cde"
        # Writes are only gathered until flush().
        assert conn.send(b"abc") == 3 and conn.send(bytearray(b"def")) == 3
        assert conn.has_output()
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(10)
        assert conn.flush() is True and not conn.has_output()
        assert b.recv(10) == b"abcdef"
        # A full socket buffer: flush() says so and keeps the rest.
        big = b"x" * (8 * 1024 * 1024)
        conn.send(big)
        assert conn.flush() is False and conn.has_output()
        # The peer going away reaches paho as an error or an empty read.
        b.close()
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        c, d = socket.socketpair()
        d.close()
        assert _Conn(c).recv(10) == b""
        c.close()
    finally:
        a.close()
        b.close()


async def test_window_and_receive_maximum_must_fit_mqtt() -> None:
    with pytest.raises(ValueError, match=r"max_inflight must be 1\.\.65535"):
        MqttClient(MqttSettings(), "x", max_inflight=70_000)
    with pytest.raises(ValueError, match=r"receive_maximum must be 1\.\.65535"):
        MqttClient(MqttSettings(), "x", receive_maximum=0)
    with pytest.raises(ValueError, match="reconnect delays"):
        MqttClient(MqttSettings(), "x", reconnect_min_s=5, reconnect_max_s=1)


async def test_reconnect_backoff_doubles_to_the_cap_with_bounded_jitter() -> None:
    c = MqttClient(MqttSettings(), "x", reconnect_min_s=0.5, reconnect_max_s=4, reconnect_jitter=0.5)
    delays = [c._next_delay() for _ in range(7)]
    bases = [0.5, 1, 2, 4, 4, 4, 4]
    assert all(b <= d <= b * 1.5 for d, b in zip(delays, bases, strict=True)), delays
    c._connected(0, "Success", False)  # a successful CONNACK resets the backoff
    assert 0.5 <= c._next_delay() <= 0.75
    # Jitter spreads a fleet: different clients do not pick the same delays.
    others = [
        MqttClient(MqttSettings(), f"y{i}", reconnect_min_s=1, reconnect_max_s=1)._next_delay() for i in range(20)
    ]
    assert len(set(others)) > 10
    no_jitter = MqttClient(MqttSettings(), "z", reconnect_min_s=1, reconnect_max_s=8, reconnect_jitter=0)
    assert [no_jitter._next_delay() for _ in range(5)] == [1, 2, 4, 8, 8]


async def test_manual_ack_hands_out_at_most_receive_maximum() -> None:
    # Brokers should stop at Receive Maximum; Mosquitto 2.0.11 does not always. The client holds the rest back.
    c = MqttClient(MqttSettings(), "x", manual_ack=True, receive_maximum=2)
    msgs = [MqttMessage("t", str(i).encode(), 1, i + 1) for i in range(5)]
    for m in msgs:
        c._deliver(m)
    assert c.messages.qsize() == 2
    first = c.messages.get_nowait()
    c.ack(first)
    assert c.messages.qsize() == 2
    c._deliver(MqttMessage("t", b"qos0", 0, 0))  # QoS 0 needs no ack and is never held
    got = [c.messages.get_nowait() for _ in range(c.messages.qsize())]
    assert [m.payload for m in got] == [b"1", b"2", b"qos0"]
    for m in got:
        c.ack(m)
    assert [c.messages.get_nowait().payload for _ in range(2)] == [b"3", b"4"]
    # A resumed session redelivers what was held back: the held copies are dropped.
    c._deliver(MqttMessage("t", b"5", 1, 6))
    c._deliver(MqttMessage("t", b"6", 1, 7))
    c._connected(0, "Success", True)
    assert c.messages.empty()
    await asyncio.sleep(0)


async def test_pubacks_are_written_straight_to_the_connection_in_arrival_order() -> None:
    """Automatic and manual PUBACKs skip paho's queue: paho's bytes, in order, sent on the next loop pass."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        for manual in (False, True):
            c = MqttClient(MqttSettings(), "x", manual_ack=manual)
            conn = _Conn(a)
            c._c._sock = conn
            c._c._state = paho._ConnectionState.MQTT_CS_CONNECTED
            c._conn = conn
            topic = b"rx/s/d/data/t"
            for mid in (1, 2, 300):  # three QoS 1 PUBLISHes in one segment
                body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + b"\x00" + b"{}"
                b.sendall(bytes([0x32, len(body)]) + body)
            c._readable()
            got = [c.messages.get_nowait() for _ in range(3)]
            assert [m.mid for m in got] == [1, 2, 300]
            if manual:
                for m in got:
                    c.ack(m)
            assert not c._c._out_packet, "nothing went through paho's queue"
            await asyncio.sleep(0)  # the flush runs after the current callback
            expected = b"".join(struct.pack("!BBH", paho.PUBACK, 2, mid) for mid in (1, 2, 300))
            assert b.recv(100) == expected
    finally:
        a.close()
        b.close()
