"""Records the trigger worker reads decode without the CloudEvents SDK exactly as with it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from reflexarc.envelope import Envelope, EnvelopeError, EventType


def _sdk(value: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
    """What the SDK path makes of a record (an Envelope or the EnvelopeError text)."""
    try:
        return Envelope.from_kafka.__func__(_NoFast, value, headers)  # type: ignore[attr-defined]
    except EnvelopeError as exc:
        return f"error: {exc}"


class _NoFast(Envelope):
    @classmethod
    def _from_kafka_fast(cls, value: Any, headers: Any) -> None:
        return None


def _ours(value: bytes | None, headers: Any) -> Any:
    try:
        return Envelope.from_kafka(value, headers)
    except EnvelopeError as exc:
        return f"error: {exc}"


BASE = Envelope.for_device(
    EventType.DATA,
    "bl1",
    "det1",
    {"value": 517, "frame": 12, "big": 2**70},
    subject="counts",
    id="e1",
    time=datetime(2024, 5, 1, 12, 0, 0, 10000, tzinfo=UTC),
)
KEY, VALUE, HEADERS = BASE.to_kafka()


def _with(name: str, raw: bytes | None) -> list[tuple[str, bytes]]:
    hs = [(n, v) for n, v in HEADERS if n != name]
    return hs if raw is None else [*hs, (name, raw)]


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (VALUE, HEADERS),
        (VALUE, list(reversed(HEADERS))),
        (VALUE, [*HEADERS, ("traceparent", b"00-abc-def-01"), ("ce_traceparent", b"00-abc")]),
        (VALUE, [*HEADERS, ("CE_ID", b"other")]),  # the SDK reads names case-insensitively
        (VALUE, _with("ce_time", b"2024-05-01T12:00:00.01Z")),  # not canonical: the SDK parses it
        (VALUE, _with("ce_time", b"2024-05-01T14:00:00+02:00")),
        (VALUE, _with("ce_time", None)),
        (VALUE, _with("ce_subject", b"")),
        (VALUE, _with("ce_subject", None)),
        (VALUE, _with("ce_id", b"")),
        (VALUE, _with("ce_id", b"\xff")),
        (VALUE, _with("ce_specversion", b"0.3")),
        (VALUE, _with("content-type", b"text/plain")),
        (VALUE, _with("content-type", None)),
        (VALUE, [*HEADERS, ("ce_datacontenttype", b"text/plain")]),
        (VALUE, [*HEADERS, ("ce_Bad-Name", b"x")]),
        (VALUE, [*HEADERS, ("ce_data", b"x")]),
        (VALUE, [*HEADERS, ("ce_partitionkey", b"x")]),
        (b'{"value": 517, "x": [1.5, -0.0, 1e5, "\\u00e9"], "y": {"z": null}}', HEADERS),  # orjson reads these
        (b'{"value": NaN}', HEADERS),  # the standard parser decides these
        (b'{"value": 1e400}', HEADERS),
        (b'{"value": "\\ud800"}', HEADERS),
        (b'\xef\xbb\xbf{"value": 1}', HEADERS),
        (b'{"value": 18446744073709551616, "v": -9223372036854775809}', HEADERS),
        (b'{"a": 1, "a": 2}', HEADERS),
        (b"[1, 2]", HEADERS),
        (b"not json", HEADERS),
        (b"\xff\xfe{}", HEADERS),
        (b"", HEADERS),
        (None, HEADERS),
        (VALUE, []),
        (BASE.to_json(), [("content-type", b"application/cloudevents+json")]),
    ],
)
def test_fast_decoding_equals_the_sdk(value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    ours, sdk = _ours(value, tuple(headers)), _sdk(value, headers)
    assert _fields(ours, headers) == _fields(sdk, headers)


def _fields(env: Any, headers: list[tuple[str, bytes]]) -> Any:
    if not isinstance(env, Envelope):
        return env
    # Without a time header both stamp "now": then only the other fields can agree.
    when = env.time if any(n == "ce_time" for n, _ in headers) else None
    return (env.type, env.source, env.data, env.id, env.subject, when, env.datacontenttype, dict(env.extensions))


def test_the_common_record_takes_the_fast_path_and_generators_still_work() -> None:
    assert Envelope._from_kafka_fast(VALUE, HEADERS) == BASE
    assert Envelope.from_kafka(VALUE, (h for h in HEADERS)) == BASE


def test_the_worker_s_event_variable_equals_the_envelope_s(tmp_path: Any) -> None:
    from reflexarc.cloud.engine import TriggerEngine, event_context
    from reflexarc.cloud.validate import compile_text
    from reflexarc.envelope import kafka_event_fields

    engine = TriggerEngine(compile_text("triggers: []\n", str(tmp_path / "t.yaml"), tmp_path))
    for value, headers in [(VALUE, HEADERS), (b'{"value": 1.5}', _with("ce_subject", b"temps"))]:
        fields = kafka_event_fields(value, headers)
        assert fields is not None
        env = Envelope.from_kafka(value, headers)
        assert engine.event_of(fields) == event_context(env)
    # The same refusals, with the same words, as check_event.
    for headers in (_with("ce_type", b"io.reflexarc.command"), _with("ce_site", None), _with("ce_subject", None)):
        fields = kafka_event_fields(VALUE, headers)
        assert fields is not None
        with pytest.raises(EnvelopeError) as fast:
            engine.event_of(fields)
        with pytest.raises(EnvelopeError) as slow:
            engine.check_event(Envelope.from_kafka(VALUE, headers))
        assert str(fast.value) == str(slow.value)
