"""The fog's fast MQTT -> Kafka transcoding gives what ``from_mqtt`` + ``to_kafka`` (the SDK path) give.

For each input both paths run; they must agree on success or failure, on
the key and headers byte for byte, on the value byte for byte for bytes data
and after parsing for JSON data (the SDK re-serialises JSON with other
whitespace), and on the Envelope each side parses back from Kafka.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from reflexarc.envelope import OCTETS, STRUCTURED, Envelope, EnvelopeError, EventType
from reflexarc.topics import Topics

T = Topics()
DATA_TOPIC = T.parse_mqtt(T.mqtt_data("s1", "dev1", "temp"))

Props = list[tuple[str, str]]


def _props(**over: str | None) -> Props:
    base: dict[str, str | None] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/sites/s1/devices/dev1",
        "type": "io.reflexarc.data",
        "time": "2024-05-01T12:00:00.123456Z",
        "subject": "temp",
        "site": "s1",
        "device": "dev1",
    }
    base.update(over)
    return [(k, v) for k, v in base.items() if v is not None]


def _slow(payload: bytes, props: Props, ctype: str | None, topic: Any) -> tuple[Envelope, Any]:
    env = Envelope.from_mqtt(payload, props, ctype, topic)
    return env, env.to_kafka()


def _value_equal(fast: bytes, slow: bytes, headers: list[tuple[str, bytes]]) -> None:
    ctype = dict(headers).get("content-type", b"").decode()
    if "json" in ctype and slow:
        assert json.loads(fast.decode()) == json.loads(slow.decode())
    else:
        assert fast == slow


def _same_time_or_now(a: Envelope, b: Envelope) -> bool:
    return a.time == b.time or abs(a.time - b.time) < timedelta(seconds=5)


def _given(payload: bytes, props: Props) -> set[str]:
    """Which of id/time the input itself carries (non-empty)."""
    p = dict(props)
    if "specversion" in p:
        return {k for k in ("id", "time") if p.get(k)}
    try:
        obj = json.loads(payload)
    except ValueError:
        return set()
    if isinstance(obj, dict) and "specversion" in obj:
        return {"id", "time"} if obj.get("time") else {"id"}
    return {k for k in ("id", "time") if isinstance(obj, dict) and isinstance(obj.get(k), str)}


def check_equivalent(payload: bytes, props: Props, ctype: str | None, topic: Any = DATA_TOPIC) -> None:
    """Both paths agree (both fail with EnvelopeError, or both give the same record)."""
    try:
        slow_env, (sk, sv, sh) = _slow(payload, props, ctype, topic)
    except EnvelopeError as exc:
        with pytest.raises(EnvelopeError) as fast_exc:
            Envelope.transcode_mqtt(payload, props, ctype, topic)
        assert str(fast_exc.value) == str(exc)
        return
    fast = Envelope.transcode_mqtt(payload, props, ctype, topic)
    fast_env, (fk, fv, fh) = fast.envelope, fast.record
    assert (fast.source, fast.id, fast.data) == (fast_env.source, fast_env.id, fast_env.data)
    assert fk == sk
    # Attributes the input did not give are stamped by each path (uuid4 id, "now"): compare the rest.
    free = {h for h in ("ce_id", "ce_time") if h[3:] not in _given(payload, props)}
    assert [h[0] for h in fh] == [h[0] for h in sh]
    assert [h for h in fh if h[0] not in free] == [h for h in sh if h[0] not in free]
    _value_equal(fv, sv, sh)
    # The parsed envelopes agree, and so do the envelopes a consumer reads back from Kafka.
    if "ce_id" in free:
        fast_env = fast_env.with_(id=slow_env.id)
    assert fast_env.with_(time=slow_env.time) == slow_env and _same_time_or_now(fast_env, slow_env)
    try:
        back_slow = Envelope.from_kafka(sv, sh, sk)
    except EnvelopeError as exc:
        # e.g. text/plain data, which the kernel cannot read back from Kafka either way
        with pytest.raises(EnvelopeError) as fast_exc:
            Envelope.from_kafka(fv, fh, fk)
        assert str(fast_exc.value) == str(exc)
        return
    back_fast = Envelope.from_kafka(fv, fh, fk).with_(id=back_slow.id if "ce_id" in free else fast_env.id)
    assert back_fast.with_(time=back_slow.time) == back_slow and _same_time_or_now(back_fast, back_slow)


# ---- MQTT 5 binary mode ------------------------------------------------------------
BINARY_CASES: list[tuple[str, bytes, Props, str | None]] = [
    ("json", b'{"value":21.5,"unit":"C"}', _props(), "application/json"),
    ("json spaced", b'{ "value" : 21.5 , "nested": {"a": [1, 2, {"b": null}]} }', _props(), "application/json"),
    ("json default ctype", b'{"value":1}', _props(), None),
    ("json charset", b'{"v":1}', _props(), "application/json; charset=utf-8"),
    ("json +json", b'{"v":1}', _props(), "application/vnd.rx+json"),
    ("unicode", '{"name":"Grüße 温度 🌡","esc":"\\u00e9\\n"}'.encode(), _props(), "application/json"),
    ("unicode attrs", b'{"v":1}', _props(id="é-✓-1", source="/sites/s1/devices/dev1/ü"), "application/json"),
    ("bytes", bytes(range(256)), _props(), OCTETS),
    ("bytes non-utf8 other type", b"\xff\xfe\x00raw", _props(), "image/png"),
    ("text", "plain text ü".encode(), _props(), "text/plain"),
    ("empty", b"", _props(), "application/json"),
    ("empty bytes", b"", _props(), OCTETS),
    ("no subject", b'{"v":1}', _props(subject=None), "application/json"),
    ("no site/device props", b'{"v":1}', _props(site=None, device=None), "application/json"),
    ("extra extensions", b'{"v":1}', _props(trace1="abc", partitionkey="pk", zz9="x"), "application/json"),
    ("dataschema", b'{"v":1}', _props(dataschema="https://example.org/s.json"), "application/json"),
    ("time offset", b'{"v":1}', _props(time="2024-05-01T14:00:00+02:00"), "application/json"),
    ("time +00:00", b'{"v":1}', _props(time="2024-05-01T12:00:00+00:00"), "application/json"),
    ("time naive", b'{"v":1}', _props(time="2024-05-01T12:00:00"), "application/json"),
    ("time millis", b'{"v":1}', _props(time="2024-05-01T12:00:00.5Z"), "application/json"),
    ("time date only", b'{"v":1}', _props(time="2024-05-01"), "application/json"),
    ("time missing", b'{"v":1}', _props(time=None), "application/json"),
    ("time empty", b'{"v":1}', _props(time=""), "application/json"),
    ("duplicate json keys", b'{"v":1,"v":2}', _props(), "application/json"),
    ("json nan", b'{"v":NaN}', _props(), "application/json"),  # the standard parser accepts it: general path
    ("json escaped lone surrogate", b'{"v":"\\ud800"}', _props(), "application/json"),
    ("json raw control char", b'{"v":"a\x01b"}', _props(), "application/json"),
    (
        "command ack type",
        b'{"command_id":"c1","status":"done"}',
        _props(type=str(EventType.COMMAND_ACK)),
        "application/json",
    ),
    # failures: both paths must refuse, with the same words
    ("bad json", b'{"v":', _props(), "application/json"),
    ("json array", b"[1,2]", _props(), "application/json"),
    ("json scalar", b"42", _props(), "application/json"),
    ("json bom", b'\xef\xbb\xbf{"v":1}', _props(), "application/json"),
    ("json utf16", '{"v":1}'.encode("utf-16"), _props(), "application/json"),
    ("json lone surrogate", b'{"v":"\xed\xa0\x80"}', _props(), "application/json"),
    ("missing id", b'{"v":1}', _props(id=None), "application/json"),
    ("empty id", b'{"v":1}', _props(id=""), "application/json"),
    ("missing source", b'{"v":1}', _props(source=None), "application/json"),
    ("missing type", b'{"v":1}', _props(type=None), "application/json"),
    ("bad specversion", b'{"v":1}', _props(specversion="0.3"), "application/json"),
    ("bad time", b'{"v":1}', _props(time="yesterday"), "application/json"),
    ("empty subject", b'{"v":1}', _props(subject=""), "application/json"),
    ("bad extension name", b'{"v":1}', _props(**{"Trace-Id": "x"}), "application/json"),
    ("data extension", b'{"v":1}', _props(data="x"), "application/json"),
    ("empty dataschema", b'{"v":1}', _props(dataschema=""), "application/json"),
    ("other device", b'{"v":1}', _props(device="dev2"), "application/json"),
    ("other site", b'{"v":1}', _props(site="s2"), "application/json"),
    ("other stream", b'{"v":1}', _props(subject="humidity"), "application/json"),
]


@pytest.mark.parametrize(("payload", "props", "ctype"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES])
def test_binary_mode_equivalent(payload: bytes, props: Props, ctype: str | None) -> None:
    """MQTT 5 binary-mode messages: fast and SDK paths agree."""
    check_equivalent(payload, props, ctype)


def test_binary_mode_without_topic() -> None:
    """Without a topic (no site/device check) both paths still agree."""
    check_equivalent(b'{"v":1}', _props(), "application/json", topic=None)
    check_equivalent(b'{"v":1}', _props(site=None), "application/json", topic=None)


def test_fast_path_forwards_original_bytes() -> None:
    """JSON data is not re-serialised: the record value is the payload as published."""
    payload = b'{ "value" : 21.5 }'
    _k, value, _h = Envelope.transcode_mqtt(payload, _props(), "application/json", DATA_TOPIC).record
    assert value is payload


def test_edge_envelopes_round_trip() -> None:
    """Whatever the edge encodes (Envelope.to_mqtt) transcodes like the SDK path, for many events."""
    now = datetime(2024, 5, 1, 12, 0, 0, 987654, tzinfo=UTC)
    zones = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=7))]
    for i in range(200):
        data: dict[str, Any] | bytes = (
            bytes([i % 256]) * (i % 7) if i % 5 == 0 else {"seq": i, "pad": "x" * (i % 13), "u": "é" * (i % 3)}
        )
        env = Envelope.for_device(
            EventType.DATA,
            "s1",
            "dev1",
            data,
            subject="temp" if i % 4 else None,
            id=f"id-{i}",
            time=(now + timedelta(seconds=i)).astimezone(zones[i % 3]),
            extensions={"seqno": str(i)} if i % 2 else None,
        )
        payload, props, ctype = env.to_mqtt(binary=True)
        check_equivalent(payload, props, ctype)
        fast_env = Envelope.transcode_mqtt(payload, props, ctype, DATA_TOPIC).envelope
        assert fast_env == Envelope.from_mqtt(payload, props, ctype, DATA_TOPIC)


def test_edge_shaped_events_are_forwarded_without_building_the_envelope() -> None:
    """The edge's own shape takes the quickest path (the cases above then test it); the rest build it at once."""
    payload = b'{"v":1}'
    fast = Envelope.transcode_mqtt(payload, _props(), "application/json", DATA_TOPIC)
    assert fast._envelope is None  # not built yet
    env = fast.envelope
    assert env == Envelope.from_mqtt(payload, _props(), "application/json", DATA_TOPIC)
    assert fast.envelope is env
    for props, ctype in [
        (_props(trace1="x"), "application/json"),  # an extension the SDK must judge
        (_props(time="2024-05-01T14:00:00+02:00"), "application/json"),  # a time that is re-written
        (list(reversed(_props())), "application/json"),  # another order: headers follow the SDK's
        (_props(), "application/json; charset=utf-8"),
    ]:
        assert Envelope.transcode_mqtt(payload, props, ctype, DATA_TOPIC)._envelope is not None


def test_per_device_headers_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device ids come from devices: the per-device header cache never grows past its bound."""
    import reflexarc.envelope as envelope_module

    monkeypatch.setattr(envelope_module, "_EDGE_DEVICE_HEADERS", {})
    monkeypatch.setattr(envelope_module, "_EDGE_DEVICE_HEADERS_MAX", 3)
    for i in range(10):
        device = f"dev{i}"
        topic = T.parse_mqtt(T.mqtt_data("s1", device, "temp"))
        props = _props(device=device, source=f"/sites/s1/devices/{device}")
        check_equivalent(b'{"v":1}', props, "application/json", topic)
        assert len(envelope_module._EDGE_DEVICE_HEADERS) <= 3
    assert envelope_module._EDGE_DEVICE_HEADERS, "the quickest path was taken (and remembered)"


def test_data_keeps_exact_numbers_on_the_quickest_path() -> None:
    """The quick JSON check reads big integers as floats: validation still sees the exact value."""
    payload = b'{"v":123456789012345678901234567890}'
    fast = Envelope.transcode_mqtt(payload, _props(), "application/json", DATA_TOPIC)
    assert fast._envelope is None
    assert fast.data == {"v": 123456789012345678901234567890} and type(fast.data["v"]) is int
    assert fast.envelope.data == fast.data


# ---- bare JSON and structured ------------------------------------------------------------
BARE_CASES: list[tuple[str, bytes]] = [
    ("plain", b'{"value": 21.5}'),
    ("own id", b'{"value": 21.5, "id": "dev-42"}'),
    ("own time", b'{"value": 21.5, "time": "2024-05-01T12:00:00Z"}'),
    ("own id and time", b'{"id": "x", "value": 1, "time": "2024-05-01T12:00:00+01:00"}'),
    ("non-string id kept", b'{"id": 7, "value": 1}'),
    ("unicode", '{"t": "Grüße 🌡"}'.encode()),
    ("bad json", b'{"value": '),
    ("array", b"[1]"),
    ("bad time", b'{"time": "noon"}'),
    ("bom", b'\xef\xbb\xbf{"v": 1}'),
]


@pytest.mark.parametrize("payload", [c[1] for c in BARE_CASES], ids=[c[0] for c in BARE_CASES])
def test_bare_json_equivalent(payload: bytes) -> None:
    """Bare JSON from devices that are not ours: fast and SDK paths agree."""
    check_equivalent(payload, [], None)
    check_equivalent(payload, [], "application/json")


def test_bare_json_needs_a_data_topic() -> None:
    """Bare JSON without a data topic is refused the same way."""
    check_equivalent(b'{"v": 1}', [], None, topic=None)


def test_structured_equivalent() -> None:
    """Structured-mode events (MQTT 3.1.1 peers) take the SDK path and agree."""
    env = Envelope.for_device(EventType.DATA, "s1", "dev1", {"v": 1, "u": "ü"}, subject="temp", id="st-1")
    check_equivalent(env.to_json(), [], STRUCTURED)
    check_equivalent(env.to_json(), [], None)
    raw = Envelope.for_device(EventType.DATA, "s1", "dev1", b"\x00\x01", subject="temp", id="st-2")
    check_equivalent(raw.to_json(), [], STRUCTURED)
    check_equivalent(b'{"specversion": "1.0", "id": "x"}', [], STRUCTURED)


TIME_FORMS = [
    "2024-05-01T12:00:00.123456Z",  # canonical: forwarded as it came
    "2024-05-01T12:00:00Z",  # canonical without a fraction
    "2024-05-01T12:00:00.000000Z",  # a zero fraction is written without it
    "2024-05-01T12:00:00.123Z",  # milliseconds are written as six digits
    "2024-05-01T12:00:00.123456+00:00",  # an offset is written as Z
    "2024-05-01T14:00:00.123456+02:00",  # another zone keeps its offset
    "2024-05-01T12:00:00.123456z",  # lower-case z
    "2024-05-01T12:00:00.123456",  # no zone: UTC is assumed
    "\uff12\uff10\uff12\uff14-05-01T12:00:00.123456Z",  # full-width digits: never forwarded as they came
]


@pytest.mark.parametrize("time_text", TIME_FORMS)
def test_time_header_is_the_sdk_s_whatever_the_input_form(time_text: str) -> None:
    """The ce_time header is byte-identical to the SDK path's, also when the original text is forwarded."""
    check_equivalent(b'{"v":1}', _props(time=time_text), "application/json")
