"""Drain the spool to the broker in order, keeping a bounded window of QoS 1 publishes in flight.

A row is deleted from the spool only after its PUBACK. While the broker is
away, paho keeps the in-flight window and re-sends it (in order) on
reconnect; the publisher waits for window space, sources keep writing to the
spool, and the backlog drains in spool order (so in order per stream) once
the broker is back. A publish the broker refuses (MQTT 5 reason code >= 0x80,
e.g. "Not authorized") can never succeed: it is moved to the spool's
dead-letter table, counted, and logged, so one bad event never blocks the rest.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.spool import AsyncSpool, SpoolRow
from reflexarc.envelope import Envelope
from reflexarc.mqtt import MqttClient, MqttError

log = logging.getLogger(__name__)


class Publisher:
    """Moves events from the spool to MQTT."""

    def __init__(self, spool: AsyncSpool, client: MqttClient, metrics: EdgeMetrics, prefix: str, window: int) -> None:
        self.spool = spool
        self.client = client
        self.metrics = metrics
        self.prefix = prefix + "/"
        self.window = window
        self.cursor = 0
        self._acked: list[int] = []
        self._ack_event = asyncio.Event()
        self._dead: list[tuple[SpoolRow, str]] = []
        self._outstanding: set[asyncio.Future[None]] = set()
        self.stopping = False
        self.published = 0

    async def run(self) -> None:
        """Publish forever (until cancelled)."""
        deleter = asyncio.create_task(self._delete_loop(), name="spool-deleter")
        try:
            await self._publish_loop()
        finally:
            deleter.cancel()
            await asyncio.gather(deleter, return_exceptions=True)

    async def _publish_loop(self) -> None:
        checked = -1
        while True:
            rows = await self.spool.read_after(self.cursor, min(self.window, 1000))
            if not rows:
                self.spool.new_data.clear()
                if self.spool.last_seq > self.cursor and self.spool.last_seq != checked:
                    # Committed while we read: look again (rows may also have been dropped).
                    checked = self.spool.last_seq
                    continue
                await self.spool.new_data.wait()
                continue
            for row in rows:
                await self._publish(row)

    async def _publish(self, row: SpoolRow) -> None:
        item = row.item
        if not item.topic.startswith(self.prefix):
            # Defence in depth: the agent only ever speaks under its own device prefix.
            self._dead.append((row, f"topic {item.topic!r} is outside this device's prefix"))
            self._advance(row)
            self._ack_event.set()
            return
        payload, props, ctype = item.payload, item.props or (), item.ctype
        if props and not self.client.v5:
            # Spooled as MQTT 5 binary, but now connected with 3.1.1: re-encode as structured.
            payload, props, ctype = Envelope.from_mqtt(payload, props, ctype).to_mqtt(binary=False)
        try:
            fut = await self.client.publish_start(
                item.topic,
                payload,
                1,
                user_properties=props,
                content_type=ctype if self.client.v5 else None,
            )
        except MqttError as exc:
            self._dead.append((row, str(exc)))
            self._advance(row)
            self._ack_event.set()
            return
        self._advance(row)
        self._outstanding.add(fut)
        fut.add_done_callback(partial(self._done, row))

    def _advance(self, row: SpoolRow) -> None:
        self.cursor = row.seq
        self.spool.read_cursor = row.seq

    def _done(self, row: SpoolRow, fut: asyncio.Future[None]) -> None:
        self._outstanding.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._acked.append(row.seq)
        elif not self.stopping and "refused" in str(exc):
            self._dead.append((row, str(exc)))
        else:
            # Disconnected at shutdown: the row stays in the spool and goes out next start.
            return
        self._ack_event.set()

    async def _delete_loop(self) -> None:
        assert self.spool.spool is not None
        while True:
            await self._ack_event.wait()
            # Let acks accumulate a little: one transaction for many rows.
            await asyncio.sleep(0.005)
            self._ack_event.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        assert self.spool.spool is not None
        acked, self._acked = self._acked, []
        dead, self._dead = self._dead, []
        for row, error in dead:
            log.error(
                "event %s on %s cannot be published: %s (kept as a dead letter)",
                row.item.event_id,
                row.item.topic,
                error,
            )
            await self.spool.call(self.spool.spool.add_dead, error, row.item.topic, row.item.payload)
            self.metrics.events_dead.inc()
        if dead:
            await self.spool.delete([row.seq for row, _ in dead], "dead_removed")
        if acked:
            await self.spool.delete(acked)
            self.published += len(acked)
            self.metrics.events_published.inc(len(acked))
        self.metrics.spool_bytes.set(self.spool.spool.bytes)

    @property
    def inflight(self) -> int:
        """Publishes awaiting the broker's ack."""
        return len(self._outstanding)

    async def settle(self, timeout: float) -> None:
        """At shutdown: wait for outstanding acks, then delete what was acknowledged."""
        if self._outstanding:
            await asyncio.wait(list(self._outstanding), timeout=timeout)
        await self._flush_acks()
