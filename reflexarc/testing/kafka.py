"""Kafka readers for integration tests: read a topic from the beginning and count what is there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.kafka import make_consumer


class KafkaTail:
    """Reads a topic from the beginning, incrementally: ``await tail.poll()`` adds what arrived."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.kafka = kafka
        self.topic = topic
        self.records: list[Any] = []
        self._c = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")

    async def __aenter__(self) -> KafkaTail:
        await self._c.start()
        deadline = time.monotonic() + 30
        parts: set[int] | None = None
        while not parts:
            await self._c.topics()
            parts = self._c.partitions_for_topic(self.topic)
            if not parts:
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {self.topic} does not exist")
                await asyncio.sleep(0.2)
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._c.assign(tps)
        await self._c.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._c.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Read what is there now; return the number of records read so far."""
        batch = await self._c.getmany(timeout_ms=timeout_ms, max_records=20_000)
        for recs in batch.values():
            self.records.extend(recs)
        return len(self.records)

    async def until(self, cond: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
        """Poll until ``cond(records)`` holds or the timeout passes; return the records."""
        deadline = time.monotonic() + timeout
        while not cond(self.records) and time.monotonic() < deadline:
            await self.poll()
        return self.records


async def read_topic(
    kafka: KafkaSettings,
    topic: str,
    until: Callable[[list[Any]], bool],
    timeout: float = 60.0,
) -> list[Any]:
    """Every record of ``topic`` from the beginning, read until ``until(records)`` or the timeout."""
    async with KafkaTail(kafka, topic) as tail:
        await tail.poll()
        return await tail.until(until, timeout)


def ids_of(records: list[Any]) -> list[str]:
    """CloudEvents ids of Kafka records (binary mode), in read order."""
    return [dict(r.headers)["ce_id"].decode() for r in records]
