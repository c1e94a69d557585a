"""The topic helper builds and parses every topic name."""

from __future__ import annotations

import pytest

from reflexarc.topics import MqttKind, TopicError, Topics, mqtt_match


def test_builds_device_scoped_mqtt_topics() -> None:
    t = Topics()
    assert t.mqtt_data("bl1", "det-1", "counts") == "rx/bl1/det-1/data/counts"
    assert t.mqtt_cmd("bl1", "det-1") == "rx/bl1/det-1/cmd"
    assert t.mqtt_ack("bl1", "det-1") == "rx/bl1/det-1/ack"
    assert t.mqtt_status("bl1", "det-1") == "rx/bl1/det-1/status"
    # Every topic of a device lives under its prefix, so one ACL line scopes it.
    prefix = t.mqtt_device_prefix("bl1", "det-1")
    for topic in (t.mqtt_data("bl1", "det-1", "x"), t.mqtt_cmd("bl1", "det-1"), t.mqtt_ack("bl1", "det-1")):
        assert topic.startswith(prefix + "/")


@pytest.mark.parametrize(
    ("topic", "kind", "stream"),
    [
        ("rx/bl1/det1/data/counts", MqttKind.DATA, "counts"),
        ("rx/bl1/det1/cmd", MqttKind.CMD, None),
        ("rx/bl1/det1/ack", MqttKind.ACK, None),
        ("rx/bl1/det1/status", MqttKind.STATUS, None),
    ],
)
def test_parse_round_trips(topic: str, kind: MqttKind, stream: str | None) -> None:
    parsed = Topics().parse_mqtt(topic)
    assert (parsed.site, parsed.device, parsed.kind, parsed.stream) == ("bl1", "det1", kind, stream)
    assert str(parsed) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "other/bl1/det1/data/counts",  # foreign namespace
        "rx/bl1/det1/data",  # data without a stream
        "rx/bl1/det1/data/a/b",  # too deep
        "rx/bl1/det1/cmd/extra",
        "rx/bl1/det1/telemetry",  # unknown kind
        "rx/bl 1/det1/ack",  # space in a level
        "rx/bl1",
    ],
)
def test_parse_rejects_foreign_or_malformed(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse_mqtt(topic)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, ".hidden", "with space"])
def test_names_cannot_inject_levels_or_wildcards(bad: str) -> None:
    with pytest.raises(TopicError):
        Topics().mqtt_data("bl1", bad, "s")


def test_kafka_names_and_keys() -> None:
    t = Topics("lab")
    assert t.kafka_data == "lab.data"
    assert t.kafka_tasks("polaris") == "lab.tasks.polaris"
    assert set(t.kafka_core()) >= {"lab.data", "lab.deadletter", "lab.results", "lab.commands", "lab.acks"}
    key = Topics.device_key("bl1", "det1")
    assert key == b"bl1/det1"
    assert Topics.parse_device_key(key) == ("bl1", "det1")
    with pytest.raises(TopicError):
        Topics.parse_device_key(b"nodevice")


def test_shared_subscription_and_filters() -> None:
    t = Topics()
    assert t.mqtt_shared("fog", "rx/+/+/data/+") == "$share/fog/rx/+/+/data/+"
    filters = t.mqtt_ingest_filters()
    assert any(mqtt_match(f, "rx/bl1/det1/data/counts") for f in filters)
    assert any(mqtt_match(f, "rx/bl1/det1/ack") for f in filters)
    assert not any(mqtt_match(f, "rx/bl1/det1/cmd") for f in filters)


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("rx/+/det1/#", "rx/bl1/det1/data/x", True),
        ("rx/#", "rx", True),
        ("rx/+", "rx/a/b", False),
        ("rx/a/b", "rx/a/b", True),
        ("rx/a/b", "rx/a", False),
    ],
)
def test_mqtt_match(flt: str, topic: str, expected: bool) -> None:
    assert mqtt_match(flt, topic) is expected


def test_parse_mqtt_caches_valid_topics_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexarc import topics as topics_mod

    monkeypatch.setattr(topics_mod, "PARSE_CACHE_SIZE", 3)
    t = Topics()
    first = t.parse_mqtt("rx/bl1/d1/data/counts")
    assert t.parse_mqtt("rx/bl1/d1/data/counts") is first
    for i in range(5):
        assert t.parse_mqtt(f"rx/bl1/d{i}/data/counts").device == f"d{i}"
    assert len(t._parsed) <= 3
    # A foreign topic is refused every time, never remembered.
    for _ in range(2):
        with pytest.raises(TopicError):
            t.parse_mqtt("rx/bl1/d+/data/counts")
    assert "rx/bl1/d+/data/counts" not in t._parsed
