"""A record the triggers cannot read is dead-lettered with its original headers, key and value."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from reflexarc.cloud.state import StateStore
from reflexarc.cloud.validate import load_triggers
from reflexarc.cloud.worker import TriggerWorker
from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope, EventType

TRIGGERS = """sites: [site.yaml]
kafka: {bootstrap_servers: '127.0.0.1:9'}
triggers:
  - name: any
    on: bl1/+/counts
    when: "true"
    then: [{task: {app: fit}}]
"""
DATA0 = TopicPartition("rx.data", 0)


class Producer:
    """Keeps every send with its headers and acks it at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, list(headers or ())))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(SimpleNamespace(offset=0))
        return fut


class Consumer:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    def assignment(self) -> set[TopicPartition]:
        return {DATA0}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def commit(self, offsets: Any) -> None:
        self.commits.append(offsets)


async def test_a_triggers_dead_letter_keeps_the_records_headers(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n")
    (tmp_path / "triggers.yaml").write_text(TRIGGERS)
    w = TriggerWorker(load_triggers(tmp_path / "triggers.yaml"), KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    producer = Producer()
    w.producer, w.consumer = producer, Consumer()
    w.store = StateStore(w.kafka, w.changelog, producer)
    w.store.partitions[0] = {}
    env = Envelope.for_device(EventType.DATA, "bl1", "d1", {"v": 1}, subject="counts", id="e1")
    key, _, headers = env.to_kafka()
    rec = SimpleNamespace(topic="rx.data", partition=0, offset=7, key=key, value=b"{not json", headers=headers)

    await w._process({DATA0: [rec]})

    (dead,) = [s for s in producer.sent if s[0] == w.topics.kafka_deadletter]
    dl = DeadLetter.from_kafka(dead[2], dead[3])
    assert dl.stage == "triggers.data" and dl.origin == "rx.data/0/7"
    assert list(dl.extra_headers) == list(headers)  # the ce_* attributes: replayable as it was
    assert dl.key == key and dl.payload == b"{not json" and dl.topic == "rx.data"
