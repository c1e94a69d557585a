"""The outbox publisher: job states and results go from the job store to Kafka, in order, each once.

Rows are published in the order the store wrote them (outbox id), a page at
a time: the page is sent, Kafka acknowledges every record (``acks=all``),
and only then are its rows marked published, in the same transaction that
reads the next page. The rows the agent itself wrote are handed over in
memory when they are committed (:meth:`OutboxPublisher.offer`), so a page
costs one small query and no re-parsing; rows written by another process
(``reflexarc jobs cancel``/``retry``) and rows left by a previous agent
process are read from the database.

After a crash, rows that were sent but not yet marked may already be on
Kafka: :meth:`OutboxPublisher.settle` looks for their event ids on their
topics before anything is sent again, so each result and each state event
is published once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from reflexarc.config import KafkaSettings
from reflexarc.hpc_bridge.metrics import EVENTS_PUBLISHED
from reflexarc.hpc_bridge.service import nap
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.store import Pending
from reflexarc.kafka import make_consumer, send_event

log = logging.getLogger(__name__)

#: Unpublished events looked up on Kafka after a restart, at most (the oldest first).
SETTLE_MAX = 100_000
#: Looked up from this long before the oldest unpublished event was written (clocks, retries).
SETTLE_MARGIN = timedelta(minutes=1)


class OutboxPublisher:
    """Publishes the job store's outbox to Kafka (one service loop: :meth:`run`)."""

    def __init__(
        self,
        jobs: AsyncJobStore,
        producer: Any,
        kafka: KafkaSettings,
        site: str,
        page: int = 2000,
        memory: int = 50_000,
    ) -> None:
        self._jobs = jobs
        self._producer = producer
        self._kafka = kafka
        self._site = site
        self._page = page
        self._memory = memory
        # Rows committed by this agent and not yet published, by outbox id (bounded: beyond
        # ``memory`` rows they are read back from the database instead).
        self._held: dict[int, Pending] = {}
        # Rows Kafka acknowledged whose "published" mark is not committed yet.
        self._acked: list[int] = []
        self._wake = asyncio.Event()
        self._stopping = False

    def offer(self, rows: list[Pending]) -> None:
        """New outbox rows, just committed (the job store calls this)."""
        if len(self._held) < self._memory:
            for p in rows:
                self._held[p.id] = p
        self._wake.set()

    async def _next_page(self, limit: int, kind: str | None = None) -> list[Pending]:
        """Commit the marks of the last page and read the next one."""
        acked, self._acked = self._acked, []
        try:
            page = await self._jobs.outbox_page(acked, limit, self._held.get, kind)
        except BaseException:
            self._acked = acked + self._acked
            raise
        for i in acked:
            self._held.pop(i, None)
        return page

    async def _send(self, page: list[Pending]) -> None:
        acks = [await send_event(self._producer, p.topic, p.envelope, key=p.key) for p in page]
        await asyncio.gather(*acks)
        self._acked.extend(p.id for p in page)
        EVENTS_PUBLISHED.labels(self._site).inc(len(page))

    async def run(self) -> None:
        """Publish until :meth:`stop`; a failed send is retried a second later (Kafka may be restarting).

        Stopping waits for the page in flight: cancelled between sending it and Kafka's
        acknowledgement, the loop would leave it to :meth:`flush`, which would send it again.
        """
        while not self._stopping:
            page = await self._next_page(self._page)
            if not page:
                # Woken by new rows; the timeout picks up rows other processes wrote.
                await nap(self._wake, 1.0)
                self._wake.clear()
                continue
            try:
                await self._send(page)
            except Exception as exc:
                log.warning("publishing %d event(s) failed (%s); retrying", len(page), exc)
                await nap(self._wake, 1.0)

    def stop(self) -> None:
        """Let :meth:`run` return once the page in flight is acknowledged (then :meth:`flush`)."""
        self._stopping = True
        self._wake.set()

    async def flush(self) -> None:
        """Publish everything pending now (at a clean stop), and commit the marks."""
        while True:
            page = await self._next_page(self._page)
            if not page:
                return
            await self._send(page)

    async def settle(self) -> None:
        """Events a crash interrupted may be on Kafka already: look before resending, mark those found."""
        since = await self._jobs.call(lambda b: b.oldest_pending())
        if since is None:
            return
        pending = await self._next_page(SETTLE_MAX)
        by_topic: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for p in pending:
            by_topic[p.topic][p.event_id].append(p.id)
        found: list[int] = []
        for topic, wanted in by_topic.items():
            for event_id in await find_published(self._kafka, topic, set(wanted), since - SETTLE_MARGIN):
                # Re-sent ids (a user's retry) have several rows: only the oldest can have been sent.
                found.append(min(wanted[event_id]))
        if found:
            log.info("%d event(s) were published before the last stop; not sending them again", len(found))
            await self._jobs.mark_published(found)
            for i in found:
                self._held.pop(i, None)


async def find_published(
    settings: KafkaSettings, topic: str, ids: set[str], since: datetime | None = None, timeout: float = 30.0
) -> set[str]:
    """Which of ``ids`` (CloudEvent ids) are already on ``topic``.

    Read from the records stamped ``since`` on (the producer stamps them when it sends them), or
    from the start where the broker cannot say where that is.
    """
    from aiokafka import TopicPartition

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    found: set[str] = set()
    try:
        await consumer.topics()  # fetches metadata for every topic
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return found
        consumer.assign(tps)
        await seek_to_time(consumer, tps, since)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        empty = 0
        # Some brokers report wrong end offsets; "two empty polls in a row" means caught up.
        while empty < 2 and loop.time() < deadline and found != ids:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            recs = [r for rs in batches.values() for r in rs]
            empty = 0 if recs else empty + 1
            for r in recs:
                for k, v in r.headers or ():
                    if k == "ce_id":
                        eid = v.decode(errors="replace")
                        if eid in ids:
                            found.add(eid)
                        break
    finally:
        await consumer.stop()
    return found


async def seek_to_time(consumer: Any, tps: list[Any], since: datetime | None) -> None:
    """Position ``consumer`` on each partition at the first record stamped ``since`` or later."""
    if since is not None:
        from aiokafka.errors import KafkaError

        try:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        except (KafkaError, ValueError) as exc:
            log.info("the broker cannot find records by time (%s); reading from the start", exc)
        else:
            for tp in tps:
                at = found.get(tp)
                if at is None:
                    await consumer.seek_to_end(tp)  # nothing written since then
                else:
                    consumer.seek(tp, at.offset)
            return
    await consumer.seek_to_beginning(*tps)
