"""Interoperability: what other clients send reaches Kafka as the CloudEvents bindings say, read by the SDK.

``mosquitto_pub`` (MQTT 5) publishes a structured-mode event that also carries user properties, an event with a
``partitionkey`` and a bare JSON command ack, through a real Mosquitto to a real fog bridge; the records the
bridge wrote are read with the cloudevents SDK's own Kafka binding.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from fog_helpers import read_topic
from outage_helpers import start_fog

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.process import ManagedProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()


def mosquitto_pub(mqtt: MqttSettings, topic: str, payload: bytes, *props: str) -> None:
    """One QoS 1 MQTT 5 publish by the Mosquitto client; ``props``: ``-D publish ...`` property pairs."""
    exe = shutil.which("mosquitto_pub")
    assert exe, "mosquitto_pub missing: scripts/system-deps.sh installs mosquitto-clients"
    argv = [exe, "-h", mqtt.host, "-p", str(mqtt.port), "-V", "mqttv5", "-q", "1", "-t", topic, "-s"]
    for i in range(0, len(props), 2):
        name, value = props[i], props[i + 1]
        argv += (
            ["-D", "publish", name, *value.split(" ", 1)] if name == "user-property" else ["-D", "publish", name, value]
        )
    subprocess.run(argv, input=payload, check=True, timeout=20)


def sdk_event(record: object) -> object:
    """The record as the cloudevents SDK's Kafka binding reads it."""
    headers = dict(record.headers)  # type: ignore[attr-defined]
    msg = ce_kafka.KafkaMessage(headers=headers, key=record.key, value=record.value or b"")  # type: ignore[attr-defined]
    return ce_kafka.from_kafka(msg, JSONFormat())


async def test_foreign_clients_reach_kafka_as_the_bindings_say(
    tmp_path: Path, mqtt_settings: MqttSettings, kafka_settings: KafkaSettings, procs: list[ManagedProcess]
) -> None:
    await start_fog(tmp_path, "fog-binding", mqtt_settings, kafka_settings, procs)
    structured = Envelope.for_device(EventType.DATA, "s1", "d1", {"v": 1}, subject="temp", id="st-1")
    keyed = Envelope.for_device(
        EventType.DATA, "s1", "d1", {"v": 2}, subject="temp", id="pk-1", extensions={"partitionkey": "run-42"}
    )
    payload, props, ctype = keyed.to_mqtt(binary=True)

    await asyncio.to_thread(
        mosquitto_pub,
        mqtt_settings,
        T.mqtt_data("s1", "d1", "temp"),
        structured.to_json(),
        "content-type",
        "application/cloudevents+json",
        "user-property",
        "origin beamline-7",
    )
    binary_props: list[str] = ["content-type", ctype]
    for name, value in props:
        binary_props += ["user-property", f"{name} {value}"]
    await asyncio.to_thread(mosquitto_pub, mqtt_settings, T.mqtt_data("s1", "d1", "temp"), payload, *binary_props)
    await asyncio.to_thread(
        mosquitto_pub, mqtt_settings, T.mqtt_ack("s1", "d1"), json.dumps({"command_id": "cmd-5", "ok": True}).encode()
    )

    data = await read_topic(kafka_settings, T.kafka_data, lambda rs: len(rs) >= 2, timeout=60)
    acks = await read_topic(kafka_settings, T.kafka_acks, lambda rs: len(rs) >= 1, timeout=60)
    dead = await read_topic(kafka_settings, T.kafka_deadletter, lambda rs: False, timeout=1)
    assert not dead, f"dead-lettered: {[dict(r.headers).get('rx-error') for r in dead]}"

    by_id = {sdk_event(r).get_id(): (r, sdk_event(r)) for r in data}  # type: ignore[attr-defined]
    rec, ev = by_id["st-1"]
    # Structured mode: the event itself, not the envelope as data, whatever user properties came with it.
    assert ev.get_data() == {"v": 1}  # type: ignore[attr-defined]
    assert ev.get_source() == "/sites/s1/devices/d1"  # type: ignore[attr-defined]
    assert rec.key == Topics.device_key("s1", "d1")
    rec, ev = by_id["pk-1"]
    assert rec.key == b"run-42"  # partitionkey is the record key...
    assert ev.get_extension("partitionkey") == "run-42"  # type: ignore[attr-defined]  # ...and is carried

    (ack,) = acks
    ack_event = sdk_event(ack)
    assert ack_event.get_type() == EventType.COMMAND_ACK.value  # type: ignore[attr-defined]
    assert ack_event.get_data()["command_id"] == "cmd-5"  # type: ignore[attr-defined]
    assert ack_event.get_data()["ok"] is True  # type: ignore[attr-defined]
    assert ack_event.get_data()["device"] == "d1"  # type: ignore[attr-defined]
