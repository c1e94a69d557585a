"""The envelope round-trips through every encoding and rejects what is not an event."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from reflexarc.envelope import STRUCTURED, DeadLetter, Envelope, EnvelopeError, EventType
from reflexarc.events import Cause, Command, CommandAck, TaskRequest, TaskResult, stable_id
from reflexarc.topics import Topics

T = Topics()


def sample(data: dict | bytes | None = None) -> Envelope:
    return Envelope.for_device(
        EventType.DATA,
        "bl1",
        "det1",
        {"value": 412.5, "frame": 7, "tags": ["a", "b"]} if data is None else data,
        subject="counts",
        id="evt-1",
        time=datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC),
    )


def test_kafka_binary_round_trip_uses_ce_headers() -> None:
    env = sample()
    key, value, headers = env.to_kafka()
    h = dict(headers)
    assert key == b"bl1/det1"
    assert h["ce_id"] == b"evt-1"
    assert h["ce_type"] == b"io.reflexarc.data"
    assert h["ce_specversion"] == b"1.0"
    assert h["ce_subject"] == b"counts"
    assert h["ce_site"] == b"bl1"
    assert h["content-type"] == b"application/json"
    assert json.loads(value) == env.data
    assert Envelope.from_kafka(value, headers, key) == env


def test_kafka_structured_record_is_read_too() -> None:
    env = sample()
    assert Envelope.from_kafka(env.to_json(), [("content-type", STRUCTURED.encode())]) == env


def test_mqtt5_binary_round_trip_uses_user_properties() -> None:
    env = sample()
    payload, props, ctype = env.to_mqtt(binary=True)
    p = dict(props)
    assert p["id"] == "evt-1" and p["specversion"] == "1.0" and p["device"] == "det1"
    assert "datacontenttype" not in p  # travels as the MQTT 5 Content Type property
    assert ctype == "application/json"
    assert json.loads(payload) == env.data
    topic = T.parse_mqtt(T.mqtt_data("bl1", "det1", "counts"))
    assert Envelope.from_mqtt(payload, props, ctype, topic) == env


def test_structured_mode_for_mqtt311() -> None:
    env = sample()
    payload, props, ctype = env.to_mqtt(binary=False)
    assert props == [] and ctype == STRUCTURED
    doc = json.loads(payload)
    assert doc["specversion"] == "1.0" and doc["data"] == env.data
    # MQTT 3.1.1 has no content type: structured mode is detected from the payload.
    assert Envelope.from_mqtt(payload, None, None) == env


def test_binary_data_round_trips_in_every_mode() -> None:
    env = sample(b"\x00\x01frame-bytes\xff")
    _key, value, headers = env.to_kafka()
    assert Envelope.from_kafka(value, headers) == env
    payload, props, ctype = env.to_mqtt(binary=True)
    assert ctype == "application/octet-stream"
    assert Envelope.from_mqtt(payload, props, ctype) == env
    payload, _, _ = env.to_mqtt(binary=False)
    assert Envelope.from_mqtt(payload, None, None) == env


def test_bare_json_from_a_foreign_device_is_wrapped_from_its_topic() -> None:
    topic = T.parse_mqtt("rx/bl1/thermo/data/temp")
    env = Envelope.from_mqtt(b'{"value": 21.5, "id": "t-9"}', None, None, topic)
    assert env.type == EventType.DATA
    assert (env.site, env.device, env.subject, env.id) == ("bl1", "thermo", "temp", "t-9")
    assert env.data == {"value": 21.5}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"specversion": "1.0", "id": "x"}', "CloudEvent"),
    ],
)
def test_malformed_payloads_raise_with_a_reason(payload: bytes, reason: str) -> None:
    topic = T.parse_mqtt("rx/bl1/det1/data/counts")
    with pytest.raises(EnvelopeError, match=reason):
        Envelope.from_mqtt(payload, None, None, topic)


def test_missing_required_attribute_in_binary_mode() -> None:
    payload, props, ctype = sample().to_mqtt()
    props = [(k, v) for k, v in props if k != "source"]
    with pytest.raises(EnvelopeError, match="source"):
        Envelope.from_mqtt(payload, props, ctype)


def test_a_device_cannot_speak_for_another() -> None:
    payload, props, ctype = sample().to_mqtt()
    other = T.parse_mqtt("rx/bl1/intruder/data/counts")
    with pytest.raises(EnvelopeError, match="device"):
        Envelope.from_mqtt(payload, props, ctype, other)


def test_typed_events_round_trip_with_stable_ids() -> None:
    cause = Cause(event_ids=["evt-1"], site="bl1", device="det1", stream="counts")
    tid = stable_id("peak", "evt-1")
    assert tid == stable_id("peak", "evt-1") != stable_id("peak", "evt-2")
    req = TaskRequest(task_id=tid, app="find_peak", site="local", trigger="peak", cause=cause)
    _, v, h = req.to_envelope().to_kafka()
    assert TaskRequest.from_envelope(Envelope.from_kafka(v, h)) == req
    res = TaskResult(task_id=tid, app="find_peak", site="local", status="done", result={"x": 1})
    assert res.to_envelope().id == f"{tid}.result"
    cmd = Command(command_id="c1", site="bl1", device="det1", actuator="motor", args={"position": 3})
    env = cmd.to_envelope()
    assert (env.site, env.device) == ("bl1", "det1")
    assert Command.from_envelope(Envelope.from_mqtt(*env.to_mqtt())) == cmd
    ack = CommandAck(command_id="c1", site="bl1", device="det1", ok=True)
    assert ack.to_envelope().id == "c1.ack"
    with pytest.raises(EnvelopeError, match="expected"):
        Command.from_envelope(ack.to_envelope())


def test_dead_letter_keeps_original_bytes_and_reason() -> None:
    dl = DeadLetter("payload is not valid JSON", "fog.ingest", "rx/bl1/det1/data/counts", b"\x00garbage")
    _key, value, headers = dl.to_kafka()
    assert value == b"\x00garbage"
    back = DeadLetter.from_kafka(value, headers)
    assert (back.error, back.stage, back.origin, back.payload) == (dl.error, dl.stage, dl.origin, dl.payload)
