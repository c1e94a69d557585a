"""Acceptance: commands reach offline devices when they come back within the deadline, or are reported
expired after it; device answers become delivered/rejected statuses."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from fog_helpers import fog_config, read_topic

from reflexarc.config import KafkaSettings, MqttSettings
from reflexarc.envelope import Envelope, EventType, utcnow
from reflexarc.events import Command, CommandAck, CommandStatus
from reflexarc.fog.bridge import FogBridge
from reflexarc.kafka import event_of, make_producer, send_event
from reflexarc.mqtt import MqttClient
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
T = Topics()


async def _send(kafka: KafkaSettings, *cmds: Command) -> None:
    producer = make_producer(kafka)
    await producer.start()
    try:
        for cmd in cmds:
            await (await send_event(producer, T.kafka_commands, cmd.to_envelope()))
    finally:
        await producer.stop()


async def _answer(dev: MqttClient, msg_timeout: float, ok: bool = True, reason: str | None = None) -> Command:
    msg = await asyncio.wait_for(dev.messages.get(), msg_timeout)
    cmd = Command.from_envelope(Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type))
    ack = CommandAck(command_id=cmd.command_id, site=cmd.site, device=cmd.device, ok=ok, reason=reason)
    payload, props, ctype = ack.to_envelope().to_mqtt(binary=True)
    await dev.publish(T.mqtt_ack(cmd.site, cmd.device), payload, 1, user_properties=props, content_type=ctype)
    return cmd


async def _statuses(kafka: KafkaSettings, n: int, timeout: float = 60) -> dict[str, CommandStatus]:
    def enough(recs: list) -> bool:
        return sum(event_of(r).type == EventType.COMMAND_STATUS.value for r in recs) >= n

    recs = await read_topic(kafka, T.kafka_acks, enough, timeout=timeout)
    out = {}
    for r in recs:
        e = event_of(r)
        if e.type == EventType.COMMAND_STATUS.value:
            s = CommandStatus.from_envelope(e)
            out[s.command_id] = s
    return out


async def test_fog_commands_for_offline_devices(mqtt_settings: MqttSettings, kafka_settings: KafkaSettings) -> None:
    cfg = fog_config(mqtt_settings, kafka_settings, commands={"retry_interval_s": 1.0})
    bridge = FogBridge(cfg)
    await bridge.start()
    try:
        # d1 has a persistent session and is offline: the broker holds the command for it.
        d1 = MqttClient(mqtt_settings, "dev-s1-d1", clean_start=False, session_expiry=300)
        await d1.connect()
        await d1.subscribe([(T.mqtt_cmd("s1", "d1"), 1)])
        await d1.disconnect()
        soon = utcnow() + timedelta(seconds=30)
        expire_at = utcnow() + timedelta(seconds=3)
        await _send(
            kafka_settings,
            Command(command_id="c-persist", site="s1", device="d1", actuator="valve", deadline=soon),
            # d2 has no session at all: only a re-publish after it subscribes reaches it.
            Command(command_id="c-fresh", site="s1", device="d2", actuator="valve", deadline=soon),
            # d3 never comes back.
            Command(command_id="c-expire", site="s1", device="d3", actuator="valve", deadline=expire_at),
            # Too late already.
            Command(
                command_id="c-late", site="s1", device="d3", actuator="valve", deadline=utcnow() - timedelta(seconds=1)
            ),
            # d4 refuses.
            Command(command_id="c-nack", site="s1", device="d4", actuator="valve", deadline=soon),
        )
        await asyncio.sleep(2.0)
        d1 = MqttClient(mqtt_settings, "dev-s1-d1", clean_start=False, session_expiry=300)
        await d1.connect()
        d2 = MqttClient(mqtt_settings, "dev-s1-d2")
        await d2.connect()
        await d2.subscribe([(T.mqtt_cmd("s1", "d2"), 1)])
        d4 = MqttClient(mqtt_settings, "dev-s1-d4")
        await d4.connect()
        await d4.subscribe([(T.mqtt_cmd("s1", "d4"), 1)])
        got1 = await _answer(d1, 15)
        got2 = await _answer(d2, 15)
        await _answer(d4, 15, ok=False, reason="valve jammed")
        for c in (d1, d2, d4):
            await c.disconnect()
        statuses = await _statuses(kafka_settings, 5)
    finally:
        await bridge.stop()
    assert (got1.command_id, got2.command_id) == ("c-persist", "c-fresh")
    assert statuses["c-persist"].status == "delivered"
    assert statuses["c-fresh"].status == "delivered"
    assert statuses["c-fresh"].attempts >= 2  # it took a re-publish to reach a device without a session
    assert statuses["c-expire"].status == "expired"
    assert statuses["c-expire"].at >= expire_at
    assert statuses["c-late"].status == "expired" and statuses["c-late"].attempts == 0
    assert statuses["c-nack"].status == "rejected" and statuses["c-nack"].reason == "valve jammed"
    assert bridge.commands is not None and not bridge.commands.pending
