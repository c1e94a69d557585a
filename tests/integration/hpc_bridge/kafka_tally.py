"""Reading everything a site published, to count it (not a test module: no ``test_`` prefix).

Waiting for "no more records" cannot tell a late duplicate from none. So a
sentinel record is written to every partition of the topics *after* the
publishers have stopped, and the topics are read from the start up to the
sentinels: every record published before is then in hand.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from reflexarc.config import KafkaSettings
from reflexarc.kafka import make_consumer, make_producer

SENTINEL = "rx-test-end"


async def read_all(kafka: KafkaSettings, topics: list[str], timeout: float = 60.0) -> list[Any]:
    """Every record on ``topics`` (aiokafka ``ConsumerRecord``), up to sentinels written now."""
    from aiokafka import TopicPartition

    producer = make_producer(kafka)
    await producer.start()
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        await consumer.topics()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        assert {tp.topic for tp in tps} == set(topics), f"missing topics: {set(topics) - {tp.topic for tp in tps}}"
        # Each reading has sentinels of its own (an earlier reading's are passed over like any record).
        mine = uuid.uuid4().hex.encode()
        await asyncio.gather(
            *[await producer.send(tp.topic, b"", partition=tp.partition, headers=[(SENTINEL, mine)]) for tp in tps]
        )
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        open_parts = set(tps)
        deadline = time.monotonic() + timeout
        while open_parts:
            assert time.monotonic() < deadline, f"sentinels not read back on {sorted(open_parts)}"
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, recs in batches.items():
                for r in recs:
                    sentinel = next((v for k, v in r.headers or () if k == SENTINEL), None)
                    if sentinel == mine:
                        open_parts.discard(tp)
                    elif sentinel is None and tp in open_parts:
                        records.append(r)
    finally:
        await consumer.stop()
        await producer.stop()
    return records


def event_id(record: Any) -> str | None:
    """The CloudEvent id of a record (Kafka binary mode), if it has one."""
    return next((v.decode() for k, v in record.headers or () if k == "ce_id"), None)
