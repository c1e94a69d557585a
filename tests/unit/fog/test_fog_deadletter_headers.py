"""A command record the fog cannot read is dead-lettered with its original headers, key and value."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from reflexarc.envelope import DeadLetter
from reflexarc.events import Command
from reflexarc.fog.commands import CommandDelivery
from reflexarc.fog.config import FogConfig
from reflexarc.fog.metrics import BridgeMetrics


class Sender:
    """Takes every record at once (stands in for the KafkaSender)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []

    async def send_and_wait(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        self.sent.append((topic, key, value, headers))


async def test_a_fog_command_dead_letter_keeps_the_records_headers() -> None:
    config = FogConfig()
    sender = Sender()
    delivery = CommandDelivery(config, sender, BridgeMetrics("unit-deadletter"))  # type: ignore[arg-type]  # a stand-in sender
    cmd = Command(command_id="c-1", site="bl1", device="d1", actuator="motor", args={"x": 1})
    key, _, headers = cmd.to_envelope().to_kafka(b"bl1/d1")
    tp = TopicPartition(config.topics().kafka_commands, 2)
    rec = SimpleNamespace(topic=tp.topic, partition=2, offset=9, key=key, value=b"{not json", headers=headers)

    await delivery._take(tp, rec)

    (dead,) = sender.sent
    assert dead[0] == config.topics().kafka_deadletter
    dl = DeadLetter.from_kafka(dead[2], dead[3])
    assert dl.stage == "command" and dl.origin == f"{tp.topic}/2/9"
    assert list(dl.extra_headers) == list(headers)
    assert dl.key == b"bl1/d1" and dl.payload == b"{not json" and dl.topic == tp.topic
