"""Which records of a failed batch did the broker write after all? Read the partition back and look.

A produce request that timed out is not necessarily lost: a broker that was
frozen (paused, swapping, a long GC) processes the requests waiting in its
socket when it continues, and writes them. Resending such a batch puts its
records in Kafka twice, and brokers without an idempotent producer (Tansu)
cannot tell. So before the sender resends a failed batch it asks
:class:`PartitionReader` which of its records are in the partition after the
offset of the last batch Kafka acknowledged there; those count as sent.

A record is recognised by its key, value and headers, byte for byte: the
same :class:`~reflexarc.fog.sender.Record` produced them. Cost: nothing while
Kafka takes every batch; after a failure, one read of the partition from the
last acknowledged offset to its end (the failed attempts and whatever other
producers wrote meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.fog.sender import Record
from reflexarc.kafka import make_consumer

log = logging.getLogger(__name__)

Identity = tuple[bytes | None, bytes, tuple[tuple[str, bytes], ...]]


def identity(key: bytes | None, value: bytes | None, headers: Any) -> Identity:
    """What makes a record the same record: key, value and headers, byte for byte."""
    return key, value or b"", tuple((k, bytes(v)) for k, v in headers or ())


class PartitionReader:
    """Reads partitions back for the sender (:class:`~reflexarc.fog.sender.Landed`), one at a time."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float) -> None:
        self.kafka = kafka
        self.timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def find(
        self, topic: str, partition: int, start: int, recs: Sequence[Record], since_ms: int = 0
    ) -> tuple[list[Record], int] | None:
        """The records of ``recs`` in ``topic[partition]`` from offset ``start`` on (``start`` < 0: from the
        first record written at ``since_ms`` or later), and the end read; None if Kafka does not answer within
        the timeout (the caller asks again later, and resends nothing meanwhile)."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._find(TopicPartition(topic, partition), start, recs, since_ms)
            except Exception as exc:  # TimeoutError and the client's errors alike: cannot tell now
                log.debug("cannot read back %s[%d] yet: %r", topic, partition, exc)
                # A consumer cut off half way is not reused.
                await self.close()
                return None

    async def _find(
        self, tp: TopicPartition, start: int, recs: Sequence[Record], since_ms: int
    ) -> tuple[list[Record], int]:
        if self._consumer is None:
            c = make_consumer(self.kafka, group_id=None, auto_offset_reset="earliest")
            await c.start()
            self._consumer = c
        c = self._consumer
        c.assign([tp])
        if start < 0:
            # No acknowledged offset yet: start at the first record of the failed attempts' time (some brokers
            # answer with the first offset of a batch: earlier, which only reads a little more).
            at = (await c.offsets_for_times({tp: since_ms})).get(tp)
            start = at.offset if at is not None and at.timestamp >= 0 else (await c.end_offsets([tp]))[tp]
        c.seek(tp, start)
        want: dict[Identity, list[Record]] = {}
        for r in recs:
            want.setdefault(identity(r.key, r.value, r.headers), []).append(r)
        found: list[Record] = []
        while True:
            batch = await c.getmany(tp, timeout_ms=200, max_records=10_000)
            for got in batch.get(tp, ()):
                same = want.get(identity(got.key, got.value, got.headers))
                if same:
                    found.append(same.pop(0))
            hw = c.highwater(tp)
            position = await c.position(tp)
            # The end is known once a fetch answered (the high watermark comes with it).
            if hw is not None and position >= hw:
                return found, position

    async def close(self) -> None:
        """Stop the consumer (a new one is made when needed)."""
        c, self._consumer = self._consumer, None
        if c is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.stop(), 5)
