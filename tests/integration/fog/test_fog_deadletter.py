"""Acceptance: malformed JSON, schema violations, oversized and garbage payloads are dead-lettered with
reasons while the valid messages around them flow on, in order."""

from __future__ import annotations

import json

import pytest
from fog_helpers import fog_config, ids_of, read_topic

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import DeadLetter, Envelope, EventType
from reflexarc.fog.bridge import FogBridge
from reflexarc.fog.metrics import value
from reflexarc.mqtt import MqttClient
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()

STREAMS = [
    {
        "match": "temp",
        "max_payload_bytes": 1024,
        "schema": {
            "type": "object",
            "required": ["value"],
            "properties": {"value": {"type": "number"}, "seq": {"type": "integer"}},
        },
    },
    {"match": "counts", "fields": {"value": {"type": "integer", "ge": 0}, "seq": {"type": "integer"}}},
]


async def test_fog_deadletters_bad_input_and_keeps_the_rest_flowing(
    mqtt_settings: MqttSettings, kafka_settings: KafkaSettings
) -> None:
    cfg = fog_config(mqtt_settings, kafka_settings, streams=STREAMS, commands={"enabled": False})
    bridge = FogBridge(cfg)
    await bridge.start()
    bad: dict[str, tuple[str, bytes]] = {}
    good_ids: list[str] = []
    try:
        async with MqttClient(mqtt_settings, "dev-mixed") as pub:
            seq = 0

            async def good(stream: str) -> None:
                nonlocal seq
                seq += 1
                env = Envelope.for_device(
                    EventType.DATA, "s1", "d1", {"value": seq, "seq": seq}, subject=stream, id=f"ok-{seq}"
                )
                payload, props, ctype = env.to_mqtt(binary=True)
                await pub.publish(
                    T.mqtt_data("s1", "d1", stream), payload, 1, user_properties=props, content_type=ctype
                )
                good_ids.append(env.id)

            async def raw(name: str, stream: str, payload: bytes, device: str = "d1") -> None:
                topic = T.mqtt_data("s1", device, stream)
                bad[name] = (topic, payload)
                await pub.publish(topic, payload, 1)

            for round_ in range(3):
                await good("temp")
                await raw(f"malformed-{round_}", "temp", b'{"value": 1,')
                await good("counts")
                await raw(f"schema-{round_}", "temp", json.dumps({"value": "hot", "id": f"bad-s{round_}"}).encode())
                await good("temp")
                await raw(f"oversized-{round_}", "temp", json.dumps({"value": 1, "pad": "x" * 2000}).encode())
                await good("counts")
                await raw(f"garbage-{round_}", "counts", bytes(range(256)))
                await raw(f"model-{round_}", "counts", json.dumps({"value": -5, "id": f"bad-m{round_}"}).encode())
                await raw(f"array-{round_}", "other", b"[1, 2, 3]")
                await good("other")
        data = await read_topic(kafka_settings, T.kafka_data, lambda r: len(r) >= len(good_ids), timeout=30)
        dead = await read_topic(kafka_settings, T.kafka_deadletter, lambda r: len(r) >= len(bad), timeout=30)
        m = bridge.metrics
        dead_count = sum(value(m.deadlettered(s)) for s in ("parse", "validate", "size"))
    finally:
        await bridge.stop()

    # Every valid event arrived, in publish order (one device -> one partition).
    assert ids_of(data) == good_ids
    assert dead_count == len(bad)
    letters = [DeadLetter.from_kafka(r.value, r.headers) for r in dead]
    by_payload = {dl.payload: dl for dl in letters}
    assert len(letters) == len(bad)
    for name, (topic, payload) in bad.items():
        dl = by_payload[payload]
        assert dl.origin == topic
        kind = name.split("-")[0]
        expected = {
            "malformed": ("parse", "not valid JSON"),
            "schema": ("validate", "schema violation at value: 'hot' is not of type 'number'"),
            "oversized": ("size", "exceeds the limit of 1024 bytes"),
            "garbage": ("parse", "not valid JSON"),
            "model": ("validate", "model violation at value: Input should be greater than or equal to 0"),
            "array": ("parse", "must be a JSON object"),
        }[kind]
        assert dl.stage == expected[0], (name, dl)
        assert expected[1] in dl.error, (name, dl.error)
