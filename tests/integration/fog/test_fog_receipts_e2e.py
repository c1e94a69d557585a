"""Receipts end to end (real Mosquitto, real Tansu): a device hears which of its events Kafka holds, only once
Kafka has them; a duplicate of a confirmed event is receipted again at once, one of a pending event is not."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from fog_helpers import fog_config, ids_of, publish_events, read_topic

from reflexarc.brokers import KafkaBroker
from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import Envelope
from reflexarc.events import Receipt
from reflexarc.fog.bridge import FogBridge
from reflexarc.fog.metrics import value
from reflexarc.mqtt import MqttClient
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()
DEVICES = [f"d{i}" for i in range(10)]  # fog_helpers.event_payload: event i comes from device d{i % 10}


async def until(cond: object, timeout: float = 30.0) -> None:
    """Wait (polling the test's own state) until ``cond()`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_fog_receipts_only_for_what_kafka_holds_and_again_for_confirmed_duplicates(
    tmp_path: Path, mqtt_settings: MqttSettings, tansu: KafkaBroker, kafka_settings: KafkaSettings
) -> None:
    cfg = fog_config(
        mqtt_settings,
        kafka_settings,
        ingest={
            "receipts": {"interval_ms": 50},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "request_timeout_ms": 30_000,
        },
        commands={"enabled": False},
    )
    bridge = FogBridge(cfg)
    await bridge.start()
    receipted: Counter[str] = Counter()
    wrong_device: list[str] = []

    async def listen(client: MqttClient) -> None:
        while True:
            msg = await client.messages.get()
            r = Receipt.from_envelope(Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type))
            assert msg.topic == T.mqtt_receipt(r.site, r.device)
            for eid in r.ids:
                receipted[eid] += 1
                if f"d{int(eid[2:]) % 10}" != r.device:
                    wrong_device.append(eid)

    device = MqttClient(mqtt_settings, "receipt-listener")
    await device.connect()
    await device.subscribe([(T.mqtt_receipt("s1", d), 1) for d in DEVICES])
    listener = asyncio.create_task(listen(device))
    try:
        # Every event is receipted once, on its own device's topic, after Kafka has it.
        await publish_events(mqtt_settings, 0, 200, client_id="dev-pub-1")
        first = {f"e-{i}" for i in range(200)}
        await until(lambda: first <= set(receipted))
        assert first <= set(ids_of(await read_topic(kafka_settings, T.kafka_data, lambda r: len(r) >= 200)))
        assert set(receipted) == first and max(receipted.values()) == 1 and not wrong_device

        # A device that did not get its receipt sends again: receipted again at once, not written again.
        await publish_events(mqtt_settings, 0, 10, client_id="dev-pub-2")
        await until(lambda: all(receipted[f"e-{i}"] == 2 for i in range(10)))
        assert value(bridge.metrics.duplicates) == 10

        # Kafka frozen: the events are taken (into the disk buffer, acknowledged in MQTT) but not receipted,
        # and a duplicate of one of them (still pending) gets no receipt either.
        tansu.process.signal(signal.SIGSTOP)
        try:
            await publish_events(mqtt_settings, 200, 400, client_id="dev-pub-3")
            await publish_events(mqtt_settings, 200, 210, client_id="dev-pub-4")
            assert bridge.ingest is not None and bridge.ingest.acks is not None
            await until(lambda: value(bridge.metrics.duplicates) == 20 and not len(bridge.ingest.acks))  # type: ignore[union-attr]
            assert bridge.buffer is not None and bridge.buffer.depth >= 150, "taken into the disk buffer"
            assert bridge.receipts.waiting == 0 and not any(f"e-{i}" in receipted for i in range(200, 400))
        finally:
            tansu.process.signal(signal.SIGCONT)
        second = {f"e-{i}" for i in range(200, 400)}
        await until(lambda: second <= set(receipted))
        assert all(receipted[e] == 1 for e in second), "the duplicates of pending events were not receipted"
        records = await read_topic(kafka_settings, T.kafka_data, lambda r: len(set(ids_of(r))) >= 400)
        ids = ids_of(records)
        assert sorted(set(ids)) == sorted(first | second) and len(ids) == 400, "each event once in Kafka"
        assert value(bridge.metrics.receipted) == 410
    finally:
        listener.cancel()
        await device.disconnect()
        await bridge.stop()
