"""Ordered MQTT acknowledgement after durable Kafka sends: the core of "nothing lost".

Each received MQTT message gets a :class:`Ticket`. A ticket is held while the
message is being handled and by every Kafka record that carries (part of) it;
when the last hold is released the message may be acknowledged. MQTT
acknowledgements go out strictly in arrival order (:class:`AckQueue`), so a
message is never acknowledged before an earlier one is safe in Kafka.

:class:`KafkaSender` produces through aiokafka's batch API: records are queued
per partition (key -> partition cached, the same mapping as aiokafka's default
partitioner) and each partition sends one batch at a time, built from what
queued up while the previous batch was in flight; one future per batch instead
of one per record. At most ``max_in_flight`` records are queued or in flight.
A batch Kafka did not take (broker down, timeout) goes back to the front of
its partition's queue and is re-sent until Kafka takes it; as only one batch
per partition is ever in flight, later records of a partition never overtake
it. While any partition is retrying no new record is accepted, so the intake
stops. Stopping the intake stops MQTT acknowledgements, and with
MQTT 5 Receive Maximum the broker then stops sending: the backlog waits in the
broker's persistent session, not in our memory.

With the disk buffer (:mod:`reflexarc.fog.spill`) the intake does not stop:
copies of the records held here are written to disk (their MQTT messages are
acknowledged then), new records go to disk, and the buffer's rows come back
through :meth:`KafkaSender.send` behind the records held here. After each
acknowledged batch ``on_sent`` is called with its records: that is when their
events are confirmed (receipts, deduplication, buffer rows deleted).

A batch whose request failed may still have been written (a frozen broker
processes the requests waiting in its socket when it continues). Before such
a batch is sent again, the partition is read back from the offset after the
last acknowledged batch (:class:`Landed`, :mod:`reflexarc.fog.landed`), and
only the records that are not there are sent again: a Kafka outage does not
leave duplicates behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.mqtt import MqttMessage

log = logging.getLogger(__name__)

#: What Kafka taking a record confirms about one event it carries:
#: ``(site, device, event id, dedupe key or None)``; site and device name the receipt topic.
Confirm = tuple[str, str, str, str | None]


@dataclass(slots=True, eq=False)
class Ticket:
    """One MQTT message waiting until everything it became is durable."""

    msg: MqttMessage | None
    owner: AckQueue
    holds: int = 1
    #: the event the message carried, once known (shapers pass tickets on, not events)
    receipt: Confirm | None = None


class AckQueue:
    """Acknowledges MQTT messages in arrival order once their tickets are released."""

    def __init__(self, ack: Callable[[MqttMessage], None], metrics: BridgeMetrics | None = None) -> None:
        self._ack = ack
        self._q: deque[Ticket] = deque()
        # The owner shows len(self) as the unacked gauge (set_function), read at scrape time.
        self._metrics = metrics
        self._empty = asyncio.Event()
        self._empty.set()
        self.acked = 0

    def new(self, msg: MqttMessage | None) -> Ticket:
        """A ticket for a message just received, held once by the caller."""
        t = Ticket(msg, self)
        self._q.append(t)
        self._empty.clear()
        return t

    @staticmethod
    def hold(ticket: Ticket) -> None:
        """Add a hold: something more must become durable before the ack."""
        ticket.holds += 1

    def release(self, ticket: Ticket) -> None:
        """Drop one hold; acknowledge every leading message that has none left."""
        ticket.holds -= 1
        if ticket.holds <= 0 and self._q and self._q[0] is ticket:
            self._drain()

    def settle(self) -> None:
        """Acknowledge every leading message with no hold left (for holds dropped in bulk)."""
        q = self._q
        if q and q[0].holds <= 0:
            self._drain()

    def _drain(self) -> None:
        q = self._q
        ack = self._ack
        n = 0
        while q and q[0].holds <= 0:
            t = q.popleft()
            if t.msg is not None:
                ack(t.msg)
            n += 1
        self.acked += n
        if not q:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._q)

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until every message was acknowledged; False on timeout."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass(slots=True, eq=False)
class Record:
    """One Kafka record, the tickets (MQTT messages) it stands for and the events it confirms once in Kafka."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    tickets: Sequence[Ticket] = ()
    #: the events this record carries (a shaped batch carries several): confirmed when Kafka has it
    receipts: Sequence[Confirm] = ()
    on_done: Callable[[], None] | None = None
    #: its row in the disk buffer (0: not in the buffer); such a record's tickets were released on disk
    seq: int = 0
    #: when the fog made it (monotonic): the start of its MQTT -> Kafka latency
    created: float = field(default_factory=time.monotonic)


class Outlet(Protocol):
    """Where the intake puts records: the sender itself, or the disk-buffer switch in front of it."""

    def try_send(self, rec: Record) -> bool:
        """Take ``rec`` at once if possible; False: ``await send(rec)`` instead."""
        ...

    async def send(self, rec: Record) -> None:
        """Take ``rec``, waiting while there is no room."""
        ...


def partition_for_key(key: bytes, partitions: Sequence[int]) -> int:
    """The partition aiokafka's default partitioner picks for ``key`` (murmur2, Java-compatible).

    ``partitions`` must be sorted by id, as aiokafka's are.
    """
    h: int = murmur2(key)  # aiokafka is untyped
    return partitions[(h & 0x7FFFFFFF) % len(partitions)]


class PartitionMap:
    """Key -> partition per topic, cached: murmur2 in pure Python costs more than the rest of a send."""

    # Keys are mostly device ids (bounded), but some streams key by event id: cap the cache.
    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._parts: dict[str, tuple[int, ...]] = {}
        self._keys: dict[str, dict[bytes, int]] = {}

    def known(self, topic: str) -> bool:
        """True when the partitions of ``topic`` are known."""
        return topic in self._parts

    def topics(self) -> list[str]:
        """The topics whose partitions are known."""
        return list(self._parts)

    def set_partitions(self, topic: str, partitions: Sequence[int] | set[int]) -> None:
        """Record the partitions of ``topic`` (dropping cached keys if they changed)."""
        parts = tuple(sorted(partitions))
        if self._parts.get(topic) != parts:
            self._parts[topic] = parts
            self._keys[topic] = {}

    def partition(self, topic: str, key: bytes | None) -> int:
        """The partition of ``key`` in ``topic`` (a random one for no key, like aiokafka)."""
        if key is None:
            return random.choice(self._parts[topic])
        cache = self._keys[topic]
        p = cache.get(key)
        if p is None:
            if len(cache) >= self.MAX_KEYS:
                cache.clear()
            p = cache[key] = partition_for_key(key, self._parts[topic])
        return p


class Landed(Protocol):
    """Reads a partition back to tell which records of a failed batch the broker wrote after all."""

    async def find(
        self, topic: str, partition: int, start: int, recs: Sequence[Record], since_ms: int = 0
    ) -> tuple[list[Record], int] | None:
        """The records of ``recs`` at offset ``start`` or later (``start`` < 0: written at ``since_ms`` or
        later), and the offset read up to; None if Kafka cannot tell now."""
        ...


@dataclass(slots=True, eq=False)
class _PartitionQueue:
    """Records waiting for one partition, and the task sending them one batch at a time."""

    topic: str
    partition: int
    pending: deque[Record] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    failing: bool = False
    #: the batch on the wire (empty: none) and when it was sent (monotonic)
    sending: list[Record] = field(default_factory=list)
    sent_at: float = 0.0
    #: the offset after the last record Kafka acknowledged here (-1: none yet): where an unacknowledged
    #: batch would be, had the broker written it after all
    acked_end: int = -1
    #: wall-clock ms of the first attempt of the batch that is failing (0: none failing)
    failing_since_ms: int = 0


class KafkaSender:
    """Sends records in per-partition batches with a bounded window; re-sends failures in order."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        metrics: BridgeMetrics,
        max_in_flight: int = 10_000,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self.producer = producer
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.retry_backoff_s = retry_backoff_s
        self.inflight = 0
        self.retrying = 0
        self.sent = 0
        self.batches = 0
        self._partmap = PartitionMap()
        self._queues: dict[tuple[str, int], _PartitionQueue] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._listening = False
        #: called with the records of every batch Kafka acknowledged, after their tickets were released
        self.on_sent: Callable[[list[Record]], None] | None = None
        #: finds which records of a failed batch the broker wrote after all (see :meth:`_settle`); None: resend all
        self.landed: Landed | None = None
        self._waiting_since = 0.0
        # Read at scrape time: no gauge update per record.
        metrics.kafka_inflight.set_function(lambda: self.inflight)
        # Backpressure: a partition is being retried (the intake stops taking records) or a send waits.
        self._waiting = 0
        metrics.backpressure.set_function(lambda: 1 if (self.retrying or self._waiting) else 0)

    def start(self) -> None:
        """Follow metadata updates so the key -> partition map follows partition changes."""
        if not self._listening:
            self.producer.client.cluster.add_listener(self._on_metadata)
            self._listening = True

    def _on_metadata(self, cluster: Any) -> None:
        for topic in self._partmap.topics():
            parts = cluster.partitions_for_topic(topic)
            if parts:
                self._partmap.set_partitions(topic, parts)

    async def close(self) -> None:
        """Stop sending (records not yet acknowledged by Kafka stay unacknowledged in MQTT)."""
        self._closed = True
        if self._listening:
            with contextlib.suppress(Exception):
                self.producer.client.cluster.remove_listener(self._on_metadata)
            self._listening = False
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _has_room(self) -> bool:
        return self.retrying == 0 and self.inflight < self.max_in_flight

    async def _ensure_partitions(self, topic: str) -> None:
        """Learn the partitions of ``topic``, waiting (intake held) while Kafka cannot tell."""
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting += 1
        try:
            await self._learn_partitions(topic)
        finally:
            self._waiting -= 1

    async def _learn_partitions(self, topic: str) -> None:
        warned = False
        while not self._partmap.known(topic):
            try:
                parts = await self.producer.partitions_for(topic)
            except KafkaError as exc:
                if not warned:
                    log.warning("Kafka metadata for %s unavailable (%s); holding the intake and retrying", topic, exc)
                    warned = True
                await asyncio.sleep(self.retry_backoff_s)
                continue
            if parts:
                self._partmap.set_partitions(topic, parts)

    def try_send(self, rec: Record) -> bool:
        """Queue ``rec`` for its partition if that can be done at once; False: ``await send(rec)`` instead.

        It can when there is room, no partition is being retried and the
        topic's partitions are known: the intake's common case, without a
        coroutine per record.
        """
        if not (self._has_room() and self._partmap.known(rec.topic)):
            return False
        self._enqueue(rec)
        return True

    async def send(self, rec: Record) -> None:
        """Queue ``rec`` for its partition; returns at once unless Kafka is slow or down."""
        if not self._has_room():
            await self.wait_room()
        if not self._partmap.known(rec.topic):
            await self._ensure_partitions(rec.topic)
        self._enqueue(rec)

    async def wait_room(self) -> None:
        """Wait until a record may be queued (no partition retrying, fewer than ``max_in_flight``)."""
        if not self._waiting:
            self._waiting_since = time.monotonic()
        self._waiting += 1
        try:
            while not self._has_room():
                self._room.clear()
                await self._room.wait()
        finally:
            self._waiting -= 1

    def stalled_for(self, now: float) -> float:
        """How long Kafka has been keeping records waiting: the oldest batch on the wire, or a send waiting for room.

        Infinite while a partition is being retried (a batch failed).
        """
        if self.retrying:
            return float("inf")
        worst = now - self._waiting_since if self._waiting else 0.0
        for q in self._queues.values():
            if q.sending and now - q.sent_at > worst:
                worst = now - q.sent_at
        return worst

    def records(self) -> list[Record]:
        """Every record queued or on the wire, each partition's in its order (the batch on the wire first)."""
        out: list[Record] = []
        for q in self._queues.values():
            out.extend(q.sending)
            out.extend(q.pending)
        return out

    def enqueue(self, rec: Record) -> None:
        """Queue ``rec`` whatever the room (the caller bounds what it hands over; topic partitions must be known)."""
        self._enqueue(rec)

    async def learn(self, topic: str) -> None:
        """Wait until the partitions of ``topic`` are known (Kafka's metadata answered)."""
        if not self._partmap.known(topic):
            await self._ensure_partitions(topic)

    def knows(self, topic: str) -> bool:
        """True when the partitions of ``topic`` are known (records for it can be queued synchronously)."""
        return self._partmap.known(topic)

    def _enqueue(self, rec: Record) -> None:
        p = self._partmap.partition(rec.topic, rec.key)
        if not self.inflight:
            self._idle.clear()
        self.inflight += 1
        q = self._queues.get((rec.topic, p))
        if q is None:
            q = self._queues[(rec.topic, p)] = _PartitionQueue(rec.topic, p)
        q.pending.append(rec)
        if q.task is None and not self._closed:
            # The task starts on the next loop turn: records queued meanwhile share its first batch.
            q.task = asyncio.create_task(self._drain(q), name=f"fog-kafka-{rec.topic}-{p}")

    async def send_and_wait(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        """Send one record and return once Kafka acknowledged it (retrying as long as it takes)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def _ok() -> None:
            if not done.done():
                done.set_result(None)

        await self.send(Record(topic, key, value, headers, on_done=_ok))
        await done

    async def _drain(self, q: _PartitionQueue) -> None:
        """Send ``q``'s records one batch at a time until it is empty (one batch in flight: order kept)."""
        try:
            pending = q.pending
            while pending:
                batch = self.producer.create_batch()
                recs: list[Record] = []
                while pending:
                    r = pending[0]
                    # None: the batch is full (the first record always fits, whatever its size).
                    if batch.append(timestamp=None, key=r.key, value=r.value, headers=r.headers) is None:
                        break
                    recs.append(pending.popleft())
                # Closed: aiokafka sends it at once instead of lingering for more records.
                batch.close()
                q.sending = recs
                q.sent_at = time.monotonic()
                if not q.failing_since_ms:
                    q.failing_since_ms = int(time.time() * 1000) - 1000
                try:
                    fut = await self.producer.send_batch(batch, q.topic, partition=q.partition)
                    meta = await fut
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if self._closed or (task is not None and task.cancelling()):
                        raise
                    # The producer dropped the batch (not us being stopped): send it again.
                    q.sending = []
                    self._batch_failed(q, recs, exc)
                    await self._settle(q, recs)
                    continue
                except Exception as exc:  # any failure means: not known to be durable, send again
                    q.sending = []
                    self._batch_failed(q, recs, exc)
                    await self._settle(q, recs)
                    continue
                q.sending = []
                q.failing_since_ms = 0
                offset = getattr(meta, "offset", None)
                if isinstance(offset, int) and offset >= 0:
                    q.acked_end = offset + len(recs)
                self._batch_sent(q, recs)
        finally:
            q.sending = []
            q.task = None

    def _batch_sent(self, q: _PartitionQueue, recs: list[Record]) -> None:
        n = len(recs)
        self.inflight -= n
        self.sent += n
        self.batches += 1
        if q.failing:
            q.failing = False
            self.retrying -= 1
            if self.retrying == 0:
                log.warning("Kafka took the records for %s again; intake resumed", q.topic)
        self.metrics.count_out(q.topic, n)
        self.metrics.kafka_latency.observe(time.monotonic() - recs[0].created)  # the batch's oldest record
        # Holds are dropped in bulk and each ack queue settles once per batch, not once per record.
        owners: list[AckQueue] = []
        for rec in recs:
            if rec.on_done is not None:
                rec.on_done()
            for t in rec.tickets:
                t.holds -= 1
                owner = t.owner
                if not owners or (owners[-1] is not owner and owner not in owners):
                    owners.append(owner)
            if rec.seq:
                # Its copy in the disk buffer must not release the tickets a second time.
                rec.tickets = ()
        for owner in owners:
            owner.settle()
        if self.on_sent is not None:
            self.on_sent(recs)
        if not self._room.is_set() and self._has_room():
            self._room.set()
        if self.inflight == 0:
            self._idle.set()

    async def _settle(self, q: _PartitionQueue, recs: list[Record]) -> None:
        """After a failed batch: wait, and drop from the retry what the broker wrote after all.

        A request that timed out may still be written: a frozen broker
        processes what waits in its socket when it continues. Sending the
        batch again would then put its records in Kafka twice (brokers such
        as Tansu have no idempotent producer). So the partition is read back
        first (:class:`Landed`), from the offset after the last acknowledged
        batch (or, before any, from the time of the first failed attempt);
        what is there counts as sent, only the rest is sent again. While
        Kafka cannot tell, nothing is resent.
        """
        await asyncio.sleep(self.retry_backoff_s)
        landed = self.landed
        if landed is None:
            return
        while not self._closed:
            try:
                found = await landed.find(q.topic, q.partition, q.acked_end, recs, q.failing_since_ms)
            except Exception as exc:  # the check itself failed: ask again, never resend blindly
                log.debug("could not read back %s[%d]: %r", q.topic, q.partition, exc)
                found = None
            if found is not None:
                break
            await asyncio.sleep(self.retry_backoff_s)
        else:
            return
        there, end = found
        q.acked_end = max(q.acked_end, end)
        if not there:
            return
        ids = {id(r) for r in there}
        keep = [r for r in q.pending if id(r) not in ids]
        gone = [r for r in q.pending if id(r) in ids]
        q.pending.clear()
        q.pending.extend(keep)
        if gone:
            log.warning(
                "%d records Kafka did not acknowledge were written to %s[%d] after all: not sent again",
                len(gone),
                q.topic,
                q.partition,
            )
            self._batch_sent(q, gone)

    def _batch_failed(self, q: _PartitionQueue, recs: list[Record], exc: BaseException) -> None:
        # Back to the front, in order: nothing later in this partition goes before them.
        q.pending.extendleft(reversed(recs))
        self.metrics.kafka_retries.inc(len(recs))
        if not q.failing:
            q.failing = True
            self.retrying += 1
            if isinstance(exc, KafkaError) and not exc.retriable:
                # Kafka will keep refusing (e.g. a record above the broker's limit): it holds
                # the intake until an operator fixes the cause, so say so loudly.
                log.error(
                    "Kafka refused a batch of %d records for %s[%d]: %r; retrying, intake held",
                    len(recs),
                    q.topic,
                    q.partition,
                    exc,
                )
            else:
                log.warning(
                    "Kafka did not take a batch for %s[%d] (%s); holding the intake and retrying",
                    q.topic,
                    q.partition,
                    exc,
                )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no record is queued or in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
