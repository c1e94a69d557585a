"""The fog bridge end to end on real Mosquitto + Tansu: data up, dead letters, commands down."""

from __future__ import annotations

import asyncio
import json

import pytest
from fog_helpers import fog_config, read_topic

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import DeadLetter, Envelope, EventType
from reflexarc.events import Command, CommandAck, CommandStatus
from reflexarc.fog.bridge import FogBridge
from reflexarc.kafka import event_of, make_producer, send_event
from reflexarc.mqtt import MqttClient
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()


async def test_fog_forwards_data_and_deadletters_bad_input(
    mqtt_settings: MqttSettings, kafka_settings: KafkaSettings
) -> None:
    cfg = fog_config(mqtt_settings, kafka_settings, commands={"enabled": False})
    bridge = FogBridge(cfg)
    await bridge.start()
    try:
        async with MqttClient(mqtt_settings, "dev-pub") as pub:
            good = Envelope.for_device(EventType.DATA, "s1", "d1", {"value": 1.5}, subject="temp")
            payload, props, ctype = good.to_mqtt(binary=True)
            await pub.publish(T.mqtt_data("s1", "d1", "temp"), payload, 1, user_properties=props, content_type=ctype)
            await pub.publish(T.mqtt_data("s1", "d1", "temp"), b"\xff\xfegarbage", 1)
            await pub.publish(T.mqtt_data("s1", "d2", "temp"), json.dumps({"value": 2, "id": "bare-1"}).encode(), 1)
        data = await read_topic(kafka_settings, T.kafka_data, lambda r: len(r) >= 2, timeout=30)
        dead = await read_topic(kafka_settings, T.kafka_deadletter, lambda r: len(r) >= 1, timeout=30)
    finally:
        await bridge.stop()
    events = sorted((event_of(r) for r in data), key=lambda e: e.device or "")
    assert [e.id for e in events] == [good.id, "bare-1"]
    assert [r.key for r in sorted(data, key=lambda r: r.key)] == [b"s1/d1", b"s1/d2"]
    assert dict(data[0].headers)["ce_type"] == EventType.DATA.value.encode()
    assert len(dead) == 1
    dl = DeadLetter.from_kafka(dead[0].value, dead[0].headers)
    assert dl.payload == b"\xff\xfegarbage"
    assert dl.stage == "parse" and "JSON" in dl.error
    assert dl.origin == T.mqtt_data("s1", "d1", "temp")


async def test_fog_delivers_commands_and_reports_status(
    mqtt_settings: MqttSettings, kafka_settings: KafkaSettings
) -> None:
    cfg = fog_config(mqtt_settings, kafka_settings)
    bridge = FogBridge(cfg)
    await bridge.start()
    try:
        async with MqttClient(mqtt_settings, "dev-s1-d1") as dev:
            await dev.subscribe([(T.mqtt_cmd("s1", "d1"), 1)])
            producer = make_producer(kafka_settings)
            await producer.start()
            try:
                cmd = Command(command_id="c-1", site="s1", device="d1", actuator="valve", args={"open": True})
                fut = await send_event(producer, T.kafka_commands, cmd.to_envelope())
                await fut
            finally:
                await producer.stop()
            msg = await asyncio.wait_for(dev.messages.get(), 30)
            got = Command.from_envelope(Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type))
            assert got == cmd
            ack = CommandAck(command_id="c-1", site="s1", device="d1", actuator="valve", ok=True)
            payload, props, ctype = ack.to_envelope().to_mqtt(binary=True)
            await dev.publish(T.mqtt_ack("s1", "d1"), payload, 1, user_properties=props, content_type=ctype)

            def has_status(recs: list) -> bool:
                return any(event_of(r).type == EventType.COMMAND_STATUS.value for r in recs)

            acks = await read_topic(kafka_settings, T.kafka_acks, has_status, timeout=30)
    finally:
        await bridge.stop()
    events = [event_of(r) for r in acks]
    assert [e.type for e in events].count(EventType.COMMAND_ACK.value) == 1
    status = [CommandStatus.from_envelope(e) for e in events if e.type == EventType.COMMAND_STATUS.value]
    assert [(s.command_id, s.status, s.attempts) for s in status] == [("c-1", "delivered", 1)]


async def test_fog_on_mqtt311_amqtt_without_shared_subscriptions(tmp_path, kafka_settings: KafkaSettings) -> None:
    """amqtt speaks only 3.1.1: no shared subscription, structured events both ways."""
    from reflexarc.brokers import start_mqtt

    broker = start_mqtt(tmp_path / "amqtt", flavour="amqtt")
    try:
        mqtt = MqttSettings(host=broker.host, port=broker.port, protocol="3.1.1")
        cfg = fog_config(mqtt, kafka_settings)
        assert cfg.share_group() is None
        bridge = FogBridge(cfg)
        await bridge.start()
        try:
            async with MqttClient(mqtt, "dev-s1-d9") as dev:
                await dev.subscribe([(T.mqtt_cmd("s1", "d9"), 1)])
                ev = Envelope.for_device(EventType.DATA, "s1", "d9", {"value": 3}, subject="temp")
                payload, props, _ctype = ev.to_mqtt(binary=False)
                assert props == []
                await dev.publish(T.mqtt_data("s1", "d9", "temp"), payload, 1)
                producer = make_producer(kafka_settings)
                await producer.start()
                try:
                    cmd = Command(command_id="c-311", site="s1", device="d9", actuator="led")
                    await (await send_event(producer, T.kafka_commands, cmd.to_envelope()))
                finally:
                    await producer.stop()
                msg = await asyncio.wait_for(dev.messages.get(), 30)
                assert msg.topic == T.mqtt_cmd("s1", "d9")
                got = Command.from_envelope(Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type))
                assert got.command_id == "c-311"
            data = await read_topic(kafka_settings, T.kafka_data, lambda r: len(r) >= 1, timeout=30)
        finally:
            await bridge.stop()
    finally:
        broker.process.stop()
    assert [event_of(r).id for r in data] == [ev.id]


async def test_fog_dedupes_and_batches(mqtt_settings: MqttSettings, kafka_settings: KafkaSettings) -> None:
    """Duplicates (same id) are dropped and counted; a batched stream arrives as batch records."""
    from reflexarc.fog.metrics import value
    from reflexarc.fog.shaping import BATCH_TYPE

    cfg = fog_config(
        mqtt_settings,
        kafka_settings,
        commands={"enabled": False},
        streams=[{"match": "fast", "shape": {"mode": "batch", "max_events": 10, "max_ms": 100}}],
    )
    bridge = FogBridge(cfg)
    await bridge.start()
    try:
        async with MqttClient(mqtt_settings, "dev-dup") as pub:
            for i in (1, 2, 1, 3, 2):  # two repeats
                ev = Envelope.for_device(EventType.DATA, "s1", "d1", {"v": i}, subject="slow", id=f"dup-{i}")
                payload, props, ctype = ev.to_mqtt(binary=True)
                await pub.publish(
                    T.mqtt_data("s1", "d1", "slow"), payload, 1, user_properties=props, content_type=ctype
                )
            for i in range(25):
                ev = Envelope.for_device(EventType.DATA, "s1", "d2", {"v": i}, subject="fast", id=f"fast-{i}")
                payload, props, ctype = ev.to_mqtt(binary=True)
                await pub.publish(
                    T.mqtt_data("s1", "d2", "fast"), payload, 1, user_properties=props, content_type=ctype
                )

        def complete(recs: list) -> bool:
            return sum(event_of(r).data.get("count", 1) for r in recs) >= 28  # type: ignore[union-attr]

        data = await read_topic(kafka_settings, T.kafka_data, complete, timeout=30)
        assert bridge.ingest is not None and bridge.ingest.acks is not None
        assert await bridge.ingest.acks.wait_empty(10), "every message, duplicates included, is acknowledged"
        dups = value(bridge.metrics.duplicates)
    finally:
        await bridge.stop()
    events = [event_of(r) for r in data]
    singles = [e.id for e in events if e.type == EventType.DATA.value]
    batches = [e for e in events if e.type == BATCH_TYPE]
    assert singles == ["dup-1", "dup-2", "dup-3"]
    assert dups == 2
    assert [b.data["count"] for b in batches] == [10, 10, 5]  # type: ignore[index]
    inner = [x["id"] for b in batches for x in b.data["events"]]  # type: ignore[index]
    assert inner == [f"fast-{i}" for i in range(25)]
