"""CloudEvents exactly to the MQTT 5 and Kafka bindings, checked against the cloudevents SDK's own Kafka binding."""

from __future__ import annotations

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat

from reflexarc.envelope import STRUCTURED, Envelope, EnvelopeError, EventType
from reflexarc.events import CommandAck
from reflexarc.topics import Topics

T = Topics()
DATA = T.parse_mqtt(T.mqtt_data("s1", "d1", "temp"))
ACK = T.parse_mqtt(T.mqtt_ack("s1", "d1"))


def _event(**ext: str) -> Envelope:
    return Envelope.for_device(EventType.DATA, "s1", "d1", {"v": 1}, subject="temp", id="e-1", extensions=ext or None)


# ---- MQTT 5: the content type decides the mode ------------------------------------
def test_structured_content_type_wins_over_user_properties() -> None:
    """Binding §3.1: application/cloudevents+json is structured mode even when user properties come along."""
    env = _event()
    props = [("specversion", "1.0"), ("id", "other"), ("trace", "x")]  # a client that adds its own properties
    for read in (Envelope.from_mqtt, lambda *a: Envelope.transcode_mqtt(*a).envelope):
        got = read(env.to_json(), props, STRUCTURED, DATA)
        assert got == env  # the event in the payload, not the envelope as data
        assert got.data == {"v": 1}
    # The content type is case-insensitive and may carry parameters.
    assert Envelope.from_mqtt(env.to_json(), props, "Application/CloudEvents+JSON; charset=utf-8", DATA) == env


def test_structured_batch_is_refused_with_what_to_send() -> None:
    with pytest.raises(EnvelopeError, match=r"application/cloudevents-batch\+json.*not supported.*send"):
        Envelope.from_mqtt(b"[]", [], "application/cloudevents-batch+json", DATA)
    with pytest.raises(EnvelopeError, match="not supported"):
        Envelope.transcode_mqtt(b"[]", [("a", "b")], "application/cloudevents-batch+json", DATA)


# ---- Kafka: partitionkey is carried and is the record key ------------------------------
def test_partitionkey_is_the_record_key_and_is_kept() -> None:
    env = _event(partitionkey="run-42")
    key, value, headers = env.to_kafka()
    assert key == b"run-42"
    assert ("ce_partitionkey", b"run-42") in headers
    # The SDK's own binding reads the same event, partitionkey included.
    sdk = ce_kafka.from_kafka(ce_kafka.KafkaMessage(headers=dict(headers), key=key, value=value), JSONFormat())
    assert sdk.get_extension("partitionkey") == "run-42"
    assert sdk.get_id() == "e-1" and sdk.get_data() == {"v": 1}
    # And we read back what the SDK writes, partitionkey kept.
    msg = ce_kafka.to_binary(env.to_cloudevent(), JSONFormat())
    assert msg.key == "run-42"
    back = Envelope.from_kafka(msg.value, list(msg.headers.items()), b"run-42")
    assert back.extensions["partitionkey"] == "run-42"
    assert back == env


def test_partitionkey_through_the_fog_fast_path() -> None:
    """A device event with a partitionkey: the fog's transcoder keys the record by it, like to_kafka."""
    env = _event(partitionkey="run-7")
    payload, props, ctype = env.to_mqtt(binary=True)
    fast = Envelope.transcode_mqtt(payload, props, ctype, DATA)
    assert fast.record[0] == b"run-7"
    assert fast.envelope.extensions["partitionkey"] == "run-7"


def test_without_partitionkey_the_key_is_the_device() -> None:
    assert _event().to_kafka()[0] == Topics.device_key("s1", "d1")
    assert _event().to_kafka(b"explicit")[0] == b"explicit"


# ---- Kafka: no data is a null value ----------------------------------------------------
def test_event_without_data_is_a_null_value_without_content_type() -> None:
    env = Envelope.for_device(EventType.DATA, "s1", "d1", None, subject="temp", id="e-2")
    key, value, headers = env.to_kafka()
    assert value is None
    assert "content-type" not in dict(headers)
    assert Envelope.from_kafka(value, headers, key) == env
    sdk = ce_kafka.from_kafka(ce_kafka.KafkaMessage(headers=dict(headers), key=key, value=b""), JSONFormat())
    assert sdk.get_data() is None and sdk.get_id() == "e-2"
    # The fog's path for an MQTT event with an empty payload writes the same record.
    payload, props, ctype = env.to_mqtt(binary=True)
    assert payload == b""
    assert Envelope.transcode_mqtt(payload, props, ctype, DATA).record == (key, None, headers)


# ---- bare JSON acks ----------------------------------------------------------------------
def test_bare_json_ack_is_a_command_ack() -> None:
    env = Envelope.from_mqtt(b'{"command_id": "c-9", "ok": false, "reason": "jammed"}', [], None, ACK)
    ack = CommandAck.from_envelope(env)
    assert (ack.command_id, ack.site, ack.device, ack.ok, ack.reason) == ("c-9", "s1", "d1", False, "jammed")
    # The same event id as an ack our own agents send: one answer per command, deduplicated alike.
    ours = CommandAck(command_id="c-9", site="s1", device="d1", ok=False, reason="jammed").to_envelope()
    assert env.id == ours.id and env.type == ours.type


def test_bare_json_ack_without_command_id_names_the_fields() -> None:
    with pytest.raises(EnvelopeError, match=r'"command_id".*"ok"'):
        Envelope.from_mqtt(b'{"ok": true}', [], None, ACK)
    with pytest.raises(EnvelopeError, match="no stream"):
        Envelope.from_mqtt(b'{"ok": true}', [], None, None)
