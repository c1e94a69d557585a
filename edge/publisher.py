"""Drain the spool to the broker in order; free a row once it is delivered.

What "delivered" means is the agent's ``delivery`` setting:

* ``broker``: the broker's PUBACK (QoS 1) frees the row.
* ``pipeline`` (the default): the fog's receipt, sent after Kafka holds the
  event, frees it; a PUBACK only starts the wait for that receipt (a broker
  with a bounded session queue may drop a message it acknowledged). At most
  ``publish.unconfirmed_max`` events are out unconfirmed; events the broker
  took but the fog did not confirm in time are sent again, in spool order,
  with backoff (see :mod:`reflexarc.edge.receipts`).

Either way at most ``publish.inflight`` publishes await their PUBACK. While
the broker is away, paho keeps that window and re-sends it (in order) on
reconnect; the publisher waits for room, sources keep writing to the spool,
and the backlog drains in spool order (so in order per stream) once the
broker is back. A publish the broker refuses (MQTT 5 reason code >= 0x80,
e.g. "Not authorized") can never succeed: it is moved to the spool's
dead-letter table, counted, and logged, so one bad event never blocks the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from functools import partial

from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.receipts import Unconfirmed
from reflexarc.edge.spool import AsyncSpool, SpoolRow
from reflexarc.envelope import Envelope
from reflexarc.mqtt import MqttClient, MqttError

log = logging.getLogger(__name__)

_SETTLE_QUIET_S = 1.0  # at shutdown, stop waiting for receipts after this long without one


class Publisher:
    """Moves events from the spool to MQTT; ``unconfirmed`` set means ``delivery: pipeline``."""

    def __init__(
        self,
        spool: AsyncSpool,
        client: MqttClient,
        metrics: EdgeMetrics,
        prefix: str,
        window: int,
        unconfirmed: Unconfirmed | None = None,
        receipt_topic: str = "",
    ) -> None:
        self.spool = spool
        self.client = client
        self.metrics = metrics
        self.prefix = prefix + "/"
        self.window = window
        self.unconfirmed = unconfirmed
        self.receipt_topic = receipt_topic
        self.cursor = 0
        self._acked: list[int] = []
        self._ack_event = asyncio.Event()
        self._dead: list[tuple[SpoolRow, str]] = []
        self._outstanding: set[asyncio.Future[None]] = set()
        self._room = asyncio.Event()  # a receipt freed part of the unconfirmed window
        self._loop = asyncio.get_running_loop()
        # How often the re-send timers are looked at (a round is at most this late).
        self._tick = min(1.0, unconfirmed.timeout_s / 4) if unconfirmed is not None else 0.0
        self._next_check = 0.0
        self._warned = False
        self.stopping = False
        self.published = 0
        self.resent = 0

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
        unconfirmed = self.unconfirmed
        while True:
            await self._resend_if_due()
            rows = await self.spool.read_after(self.cursor, min(self.window, 1000))
            if not rows:
                self.spool.new_data.clear()
                if self.spool.last_seq > self.cursor and self.spool.last_seq != checked:
                    # Committed while we read: look again (rows may also have been dropped).
                    checked = self.spool.last_seq
                    continue
                await self._wait(self.spool.new_data)
                continue
            for row in rows:
                if unconfirmed is not None:
                    await self._resend_if_due()
                    if unconfirmed.full:
                        while unconfirmed.full:
                            self._room.clear()
                            await self._wait(self._room)
                            await self._resend_if_due()
                        # The wait may have been long: read the spool again (drop_oldest may have
                        # dropped the rest of this batch meanwhile).
                        break
                await self._publish(row)

    async def _wait(self, event: asyncio.Event) -> None:
        """Until ``event``; with receipts also wake up to look at the re-send timers."""
        if self.unconfirmed is None:
            await event.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._tick):
                await event.wait()

    async def _publish(self, row: SpoolRow) -> None:
        """First send of a row (in spool order)."""
        fut = await self._send(row)
        self._advance(row)
        if fut is None:
            return
        if self.unconfirmed is not None:
            self.unconfirmed.sent(row.item.event_id, row.seq)
        self._outstanding.add(fut)
        fut.add_done_callback(partial(self._done, row))

    async def _send(self, row: SpoolRow) -> asyncio.Future[None] | None:
        """Hand a row to the MQTT client; None if it can never be published (it becomes a dead letter)."""
        item = row.item
        if not item.topic.startswith(self.prefix):
            # Defence in depth: the agent only ever speaks under its own device prefix.
            self._dead.append((row, f"topic {item.topic!r} is outside this device's prefix"))
            self._ack_event.set()
            return None
        payload, props, ctype = item.payload, item.props or (), item.ctype
        if props and not self.client.v5:
            # Spooled as MQTT 5 binary, but now connected with 3.1.1: re-encode as structured.
            payload, props, ctype = Envelope.from_mqtt(payload, props, ctype).to_mqtt(binary=False)
        try:
            return await self.client.publish_start(
                item.topic,
                payload,
                1,
                user_properties=props,
                content_type=ctype if self.client.v5 else None,
            )
        except MqttError as exc:
            self._dead.append((row, str(exc)))
            if self.unconfirmed is not None:
                self.unconfirmed.forget(item.event_id, row.seq)
            self._ack_event.set()
            return None

    def _advance(self, row: SpoolRow) -> None:
        self.cursor = row.seq
        self.spool.read_cursor = row.seq

    def _done(self, row: SpoolRow, fut: asyncio.Future[None]) -> None:
        self._outstanding.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            if self.unconfirmed is None:
                self._acked.append(row.seq)
            else:
                # The broker has it: the wait for the fog's receipt starts (the row stays).
                self.unconfirmed.acked(row.item.event_id, row.seq)
                return
        elif not self.stopping and "refused" in str(exc):
            self._dead.append((row, str(exc)))
            if self.unconfirmed is not None:
                self.unconfirmed.forget(row.item.event_id, row.seq)
        else:
            # Disconnected at shutdown: the row stays in the spool and goes out next start.
            return
        self._ack_event.set()

    # ---- receipts (delivery: pipeline) ----------------------------------------------
    def confirm(self, ids: Iterable[str]) -> int:
        """The fog's receipt: free the rows of these ids (unknown ids are ignored); returns rows freed."""
        unconfirmed = self.unconfirmed
        assert unconfirmed is not None
        unknown = unconfirmed.unknown
        freed = unconfirmed.confirm(ids)
        if unconfirmed.unknown != unknown:
            self.metrics.receipt_ids_unknown.inc(unconfirmed.unknown - unknown)
        if freed:
            self._acked.extend(freed)
            self._ack_event.set()
            self._room.set()
            self._warned = False  # the fog answers: warn again if it falls silent again
        return len(freed)

    async def _resend_if_due(self) -> None:
        """Send again, in spool order, what the broker took but the fog has not confirmed in time."""
        unconfirmed = self.unconfirmed
        now = self._loop.time()
        if unconfirmed is None or now < self._next_check:
            return
        self._next_check = now + self._tick  # the look costs a pass over the window: once a tick
        if not self.client.connected.is_set():
            return  # nothing can be confirmed meanwhile; paho re-sends its own window on reconnect
        due = unconfirmed.due()
        if not due:
            return
        if not unconfirmed.probing:
            self._warned = False
        elif not self._warned:
            # Once per silence of the fog: the likely causes, and the way out for a broker without a fog.
            self._warned = True
            silence = unconfirmed.silence()
            log.warning(
                "no receipt from the fog %s: %d event(s) await one, the oldest for %.0f s; asking again "
                "with the oldest %d, with backoff. Is a fog bridge with receipts running behind this broker, and "
                "may this device read %s (broker ACL)? For a broker with no fog behind it set delivery: broker",
                "since the agent started" if silence is None else f"for {silence:.0f} s",
                len(unconfirmed),
                unconfirmed.oldest_age() or 0.0,
                len(due),
                self.receipt_topic,
            )
        wanted = dict(due)
        sent = 0
        for start in range(0, len(due), 500):
            chunk = due[start : start + 500]
            rows = await self.spool.read_seqs([seq for seq, _ in chunk])
            if len(rows) < len(chunk):
                # Not in the spool any more (cannot happen while only receipts and dead letters remove
                # handed-out rows): stop waiting for them rather than block the window for good.
                found = {row.seq for row in rows}
                for seq, eid in chunk:
                    if seq not in found:
                        unconfirmed.forget(eid, seq)
            for row in rows:
                eid = row.item.event_id
                if wanted.get(row.seq) != eid or eid not in unconfirmed:
                    continue  # confirmed while we read
                fut = await self._send(row)
                if fut is None:
                    continue
                sent += 1
                self._outstanding.add(fut)
                fut.add_done_callback(partial(self._done, row))
        self.resent += sent
        self.metrics.events_resent.inc(sent)
        log.info("sent %d unconfirmed event(s) again (%d await the fog's receipt)", sent, len(unconfirmed))

    # ---- freeing rows ---------------------------------------------------------------
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
            self.metrics.observe_spool_age(self.spool.spool.freed_oldest)
            self.published += len(acked)
            self.metrics.events_published.inc(len(acked))
        self.metrics.spool_bytes.set(self.spool.spool.bytes)

    @property
    def inflight(self) -> int:
        """Publishes awaiting the broker's ack."""
        return len(self._outstanding)

    async def settle(self, timeout: float) -> None:
        """At shutdown: wait for outstanding acks (and receipts, while they come), then free what was delivered."""
        deadline = self._loop.time() + timeout
        if self._outstanding:
            await asyncio.wait(list(self._outstanding), timeout=timeout)
        unconfirmed = self.unconfirmed
        if unconfirmed is not None:
            # Receipts keep coming while the inbox runs; stop when all are in or they stop coming.
            while len(unconfirmed) and self._loop.time() < deadline:
                self._room.clear()
                try:
                    async with asyncio.timeout(min(_SETTLE_QUIET_S, max(deadline - self._loop.time(), 0))):
                        await self._room.wait()
                except TimeoutError:
                    break
        await self._flush_acks()
