"""Trigger state per device, kept in memory per data partition and made durable in a changelog topic.

Each data partition ``p`` has its state in partition ``p`` of the changelog
(``{app_id}-trigger-state-changelog``): records keyed ``site/device`` whose
value is the JSON of that device's bundle (the state of every trigger for the
device). The worker writes a device's bundle once per batch that changed it,
after the batch's requests are acknowledged, and commits the batch's offsets
only after those writes are acknowledged too.

**Recovery boundary: a marker, not the end offset.** A worker that takes a
partition must read its changelog to the end before it processes an event.
Kafka's answer to "where is the end?" (ListOffsets, the high watermark) is
wrong on Tansu when the last batch holds several records (it reports the first
offset of that batch + 1), which stopped faust's recovery early unless every
changelog record went in a batch of its own - a cap near a thousand events a
second. Instead the worker appends a *marker* record to the partition (a
tombstone under a reserved key, so compaction removes it) and reads until it
has read the marker: the offset the broker acknowledged for it is past every
record written before, whatever the broker says about ends. This costs one
record per partition and recovery, works on every Kafka-protocol broker, and
lets state writes go in batches of any size.

A previous owner of the partition wrote its last records before it lost the
partition: aiokafka calls the revocation callback, where the worker finishes
its batch and commits, before any member is given the partition; a process
that died wrote nothing more. (A process frozen for longer than the session
timeout that wakes up mid-batch could still append a stale record after the
new owner's marker: as with any Kafka consumer without transactions, which
Tansu lacks.)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.kafka import make_consumer

log = logging.getLogger(__name__)

# The key of recovery markers: never a device key (those are site/device names).
MARKER_KEY = b"\x00rx-recovery-marker"

Bundle = dict[str, dict[str, Any]]


def changelog_topic(app_id: str) -> str:
    """The changelog topic of a worker group (the name faust gave its table's changelog)."""
    return f"{app_id}-trigger-state-changelog"


def encode(bundle: Bundle) -> bytes:
    """A bundle as a changelog value (the standard JSON writer: exact for every number it holds)."""
    return json.dumps(bundle, separators=(",", ":")).encode()


class StateStore:
    """Bundles by data partition and device; durable through the changelog topic."""

    def __init__(self, kafka: KafkaSettings, topic: str, producer: Any) -> None:
        self.kafka = kafka
        self.topic = topic
        self.producer = producer
        self.partitions: dict[int, dict[str, Bundle]] = {}

    def __contains__(self, partition: int) -> bool:
        return partition in self.partitions

    def devices(self, partition: int) -> dict[str, Bundle]:
        """The bundles of one recovered partition, by device key (mutable: the engine updates them)."""
        return self.partitions[partition]

    async def write(self, partition: int, device: str, bundle: Bundle) -> asyncio.Future[Any]:
        """Queue a device's bundle for the changelog; await the result for the broker's ack."""
        fut: asyncio.Future[Any] = await self.producer.send(
            self.topic, key=device.encode(), value=encode(bundle), partition=partition
        )
        return fut

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions this worker no longer owns."""
        for p in partitions:
            self.partitions.pop(p, None)

    async def recover(self, partitions: Iterable[int], fetch_wait_ms: int = 10) -> None:
        """Read the changelog of ``partitions`` up to a marker written now (see the module docstring)."""
        wanted = sorted(set(partitions) - set(self.partitions))
        if not wanted:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        markers = await asyncio.gather(
            *[await self.producer.send(self.topic, key=MARKER_KEY, value=None, partition=p) for p in wanted]
        )
        until = {TopicPartition(self.topic, p): md.offset for p, md in zip(wanted, markers, strict=True)}
        states: dict[int, dict[str, Bundle]] = {p: {} for p in wanted}
        reader = make_consumer(self.kafka, group_id=None, fetch_max_wait_ms=fetch_wait_ms)
        await reader.start()
        records = 0
        try:
            reader.assign(list(until))
            await reader.seek_to_beginning(*until)
            pending = dict(until)
            while pending:
                batch = await reader.getmany(*pending, timeout_ms=1000)
                for tp, recs in batch.items():
                    store = states[tp.partition]
                    end = pending.get(tp)
                    for rec in recs:
                        if end is None or rec.offset > end:
                            break
                        if rec.offset == end:
                            pending.pop(tp, None)
                            end = None
                            continue
                        records += 1
                        if rec.key is None or rec.key == MARKER_KEY:
                            continue
                        device = rec.key.decode()
                        if rec.value is None:
                            store.pop(device, None)
                        else:
                            store[device] = json.loads(rec.value)
        finally:
            await reader.stop()
        self.partitions.update(states)
        log.info(
            "recovered trigger state of partitions %s: %d devices from %d changelog records in %.2f s",
            wanted,
            sum(len(s) for s in states.values()),
            records,
            loop.time() - t0,
        )
