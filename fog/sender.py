"""Ordered MQTT acknowledgement after durable Kafka sends: the core of "nothing lost".

Each received MQTT message gets a :class:`Ticket`. A ticket is held while the
message is being handled and by every Kafka record that carries (part of) it;
when the last hold is released the message may be acknowledged. MQTT
acknowledgements go out strictly in arrival order (:class:`AckQueue`), so a
message is never acknowledged before an earlier one is safe in Kafka.

:class:`KafkaSender` keeps many records in flight (Kafka acknowledges batches,
so awaiting each record in turn would crawl) but never more than
``max_in_flight``. A record Kafka did not take (broker down, timeout) is
re-sent, in the original order, until Kafka takes it; while any record is
being retried no new record is sent, so later records do not overtake it and
the intake stops. Stopping the intake stops MQTT acknowledgements, and with
MQTT 5 Receive Maximum the broker then stops sending: the backlog waits in the
broker's persistent session, not in our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.mqtt import MqttMessage

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Ticket:
    """One MQTT message waiting until everything it became is durable."""

    msg: MqttMessage | None
    owner: AckQueue
    holds: int = 1


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
    """One Kafka record and the tickets (MQTT messages) it stands for."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    tickets: Sequence[Ticket] = ()
    on_done: Callable[[], None] | None = None
    seq: int = 0
    retrying: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class KafkaSender:
    """Sends records with a bounded window; re-sends failures in order; releases tickets on success."""

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
        self._seq = 0
        self._retry: list[Record] = []
        self._retry_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        # Read at scrape time: no gauge update per record.
        metrics.kafka_inflight.set_function(lambda: self.inflight)

    def start(self) -> None:
        """Start the retry worker."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._retry_loop(), name="fog-kafka-retry")

    async def close(self) -> None:
        """Stop the retry worker (records still failing stay unacknowledged in MQTT)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _has_room(self) -> bool:
        return self.retrying == 0 and self.inflight < self.max_in_flight

    async def send(self, rec: Record) -> None:
        """Queue ``rec``; returns when it is handed to the producer (waits while Kafka is slow or down)."""
        if not self._has_room():
            self.metrics.backpressure.set(1)
            while not self._has_room():
                self._room.clear()
                await self._room.wait()
            self.metrics.backpressure.set(0)
        self._seq += 1
        rec.seq = self._seq
        self.inflight += 1
        self._idle.clear()
        await self._produce(rec)

    async def send_and_wait(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Send one record and return once Kafka acknowledged it (retrying as long as it takes)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def _ok() -> None:
            if not done.done():
                done.set_result(None)

        await self.send(Record(topic, key, value, headers, on_done=_ok))
        await done

    async def _produce(self, rec: Record) -> None:
        try:
            fut = await self.producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers)
        except KafkaError as exc:
            # Metadata or buffer space did not come within the request timeout: Kafka is down.
            self._failed(rec, exc)
            return
        fut.add_done_callback(lambda f, rec=rec: self._sent(rec, f))

    def _sent(self, rec: Record, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._failed(rec, exc)
            return
        self.inflight -= 1
        self.sent += 1
        if rec.retrying:
            rec.retrying = False
            self.retrying -= 1
        self.metrics.count_out(rec.topic)
        if rec.on_done is not None:
            rec.on_done()
        for t in rec.tickets:
            t.owner.release(t)
        if not self._room.is_set() and self._has_room():
            self._room.set()
        if self.inflight == 0:
            self._idle.set()

    def _failed(self, rec: Record, exc: BaseException | None) -> None:
        if isinstance(exc, KafkaError) and not exc.retriable and not rec.retrying:
            # Kafka will keep refusing this record (e.g. too large for the broker's limit):
            # it holds the intake until an operator fixes the cause, so say so loudly.
            log.error("Kafka refused a record for %s (%d bytes): %r; retrying, intake held",
                      rec.topic, len(rec.value), exc)
        if not rec.retrying:
            rec.retrying = True
            self.retrying += 1
            if self.retrying == 1:
                log.warning("Kafka did not take a record for %s (%s); holding the intake and retrying",
                            rec.topic, exc or "cancelled")
        self._retry.append(rec)
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        while True:
            await self._retry_wake.wait()
            await asyncio.sleep(self.retry_backoff_s)
            self._retry_wake.clear()
            batch = sorted(self._retry, key=lambda r: r.seq)
            self._retry.clear()
            for i, rec in enumerate(batch):
                self.metrics.kafka_retries.inc()
                try:
                    fut = await self.producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers)
                except KafkaError:
                    # Still down: put this one and the rest back, in order, and wait again.
                    self._retry.extend(batch[i:])
                    self._retry_wake.set()
                    break
                fut.add_done_callback(lambda f, rec=rec: self._sent(rec, f))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no record is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
