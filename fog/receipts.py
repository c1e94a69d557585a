"""End-to-end receipts: the fog tells each device which of its events Kafka now holds.

A broker at its packaged limits may drop a QoS 1 message after it PUBACKed
it, so a device that frees its spool on the PUBACK can lose events. With
receipts it frees them only when the fog says Kafka has them: after Kafka
acknowledged (``acks=all``) the record carrying an event, its id is confirmed
here (the dedupe window learns it too), grouped per device, and published
as one :class:`~reflexarc.events.Receipt` per device every
``ingest.receipts.interval_ms``, or at once when ``max_ids`` wait for one
device, on ``{ns}/{site}/{device}/receipt``.

A device re-sends what stays unconfirmed, so receipts may be lost: a
duplicate whose original Kafka already has is answered with a receipt at
once (:meth:`Receipts.again`); one whose original is still on its way gets
none (its receipt follows when Kafka has it). Events the bridge consumed
without a Kafka record of their own (downsampled) are confirmed when they are
dropped, and events that became dead letters when the dead letter is in
Kafka: either way the device must stop re-sending them.

Receipts go out with QoS 1 by default: the broker then keeps them in the
session of a device that is briefly offline, so it does not re-send
events that are already in Kafka; the PUBACK it costs is per receipt (up to
``max_ids`` events), not per event. QoS 0 is enough for correctness (a lost
receipt only makes the device re-send, and the re-sent event is receipted
again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from reflexarc.aio import cancel_and_wait
from reflexarc.events import Receipt
from reflexarc.fog.config import ReceiptSettings
from reflexarc.fog.dedupe import DedupeWindow
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.sender import Confirm, Record
from reflexarc.mqtt import MqttClient, MqttError
from reflexarc.topics import Topics

log = logging.getLogger(__name__)

#: ids waiting for their receipt at most (a broker that takes no publishes for long): beyond, they are dropped
#: and counted; their devices re-send those events and get them receipted then.
MAX_PENDING = 200_000


class Receipts:
    """Confirmed events, grouped per device and published as receipts; the dedupe window learns them too."""

    def __init__(
        self,
        settings: ReceiptSettings,
        topics: Topics,
        metrics: BridgeMetrics,
        dedupe: DedupeWindow | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.topics = topics
        self.metrics = metrics
        self.dedupe = dedupe
        self.max_pending = max_pending
        self.interval_s = settings.interval_ms / 1000.0
        self.client: MqttClient | None = None
        self._pending: dict[tuple[str, str], list[str]] = {}
        self._count = 0
        self._due = asyncio.Event()
        self._topics: dict[tuple[str, str], str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.published = 0

    # ---- what Kafka took ---------------------------------------------------------
    def confirmed(self, recs: Sequence[Record]) -> None:
        """Kafka acknowledged ``recs``: their events are confirmed (dedupe) and queued for their devices' receipts."""
        # Once per Kafka batch, for every event: the loop is written out (no call per event).
        confirm = self.dedupe.confirm if self.dedupe is not None else None
        if not self.enabled:
            if confirm is not None:
                for rec in recs:
                    for entry in rec.receipts:
                        if entry[3] is not None:
                            confirm(entry[3])
            return
        pending = self._pending
        count = self._count
        room = self.max_pending - count
        due = False
        step = self.settings.max_ids
        for rec in recs:
            for site, device, eid, key in rec.receipts:
                if key is not None and confirm is not None:
                    confirm(key)
                if room <= 0:
                    self.metrics.receipts_dropped.inc()
                    continue
                ids = pending.get((site, device))
                if ids is None:
                    ids = pending[(site, device)] = []
                ids.append(eid)
                room -= 1
                count += 1
                if len(ids) >= step:
                    due = True
        self._count = count
        if due:
            self._due.set()

    def again(self, entry: Confirm) -> None:
        """Receipt an event whose original is already confirmed (the device did not get, or lost, its receipt)."""
        if self.enabled:
            self._add(entry)

    def consumed(self, entry: Confirm) -> None:
        """An event taken on purpose without a record of its own (downsampled): confirm it now."""
        if entry[3] is not None and self.dedupe is not None:
            self.dedupe.confirm(entry[3])
        if self.enabled:
            self._add(entry)

    def _add(self, entry: Confirm) -> None:
        if self._count >= self.max_pending:
            self.metrics.receipts_dropped.inc()
            return
        dev = (entry[0], entry[1])
        ids = self._pending.get(dev)
        if ids is None:
            ids = self._pending[dev] = []
        ids.append(entry[2])
        self._count += 1
        if len(ids) >= self.settings.max_ids:
            self._due.set()

    @property
    def waiting(self) -> int:
        """Ids confirmed and not yet published in a receipt."""
        return self._count

    # ---- publishing ----------------------------------------------------------------
    def start(self, client: MqttClient) -> None:
        """Publish receipts on ``client`` (the ingest's connection) from now on."""
        self.client = client
        if self.enabled and not self._tasks:
            self._tasks.append(asyncio.create_task(self._run(), name="fog-receipts"))

    async def stop(self) -> None:
        """Publish what is waiting (if the connection is up), then stop."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.client is not None and self.client.connected.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), 2.0)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self.interval_s)
            self._due.clear()
            if self._pending:
                await self.flush()

    async def flush(self) -> None:
        """Publish one receipt per device with what is waiting (``max_ids`` ids per message)."""
        client = self.client
        if client is None or not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._count = 0
        step = self.settings.max_ids
        for (site, device), ids in pending.items():
            topic = self._topics.get((site, device))
            if topic is None:
                topic = self.topics.mqtt_receipt(site, device)
                if len(self._topics) < 100_000:
                    self._topics[(site, device)] = topic
            for i in range(0, len(ids), step):
                chunk = ids[i : i + step]
                payload, props, ctype = (
                    Receipt(site=site, device=device, ids=chunk).to_envelope().to_mqtt(binary=client.v5)
                )
                try:
                    # Waits only for room in the client's in-flight window, not for the broker's PUBACK.
                    fut = await client.publish_start(topic, payload, self.settings.qos, False, props, ctype)
                except MqttError as exc:
                    log.warning("could not publish a receipt to %s: %s", topic, exc)
                    continue
                fut.add_done_callback(_ignore_result)
                self.published += 1
                self.metrics.receipts.inc()
                self.metrics.receipted.inc(len(chunk))


def _ignore_result(fut: asyncio.Future[None]) -> None:
    # A receipt the broker refused or that a disconnect cut off is only a receipt: the device re-sends.
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("a receipt was not delivered: %s", fut.exception())
