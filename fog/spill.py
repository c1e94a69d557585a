"""Between the intake and Kafka: the direct path while Kafka keeps up, the disk buffer while it does not.

Direct (the steady state): records go to :class:`~reflexarc.fog.sender.KafkaSender`
and their MQTT messages are acknowledged when Kafka has them; nothing is
written to disk.

When Kafka is slow or away (a record has waited ``spill_after_ms`` for it,
a batch failed, or the sender has had no room for that long) the buffer
engages:

* copies of the records the sender holds (on the wire and queued) are written
  to the disk buffer; the sender keeps them and sends them itself, in order
  (a batch that failed is read back first: :mod:`reflexarc.fog.landed`);
* from then on every new record is written to the buffer;
* each MQTT message is acknowledged as soon as its records are committed to
  disk, so the broker keeps sending and its bounded session queue does not
  overflow, whatever the length of the outage (up to ``max_events``/
  ``max_bytes``; a full buffer stops the intake: backpressure, as without it).

The drain (this module's loop) forwards the rows in order through the
sender, which keeps one batch per partition on the wire, so a device's order
holds: the rows of the records the sender held at engagement are skipped
(the sender has them), and a row is deleted when Kafka acknowledged its
record; receipts go out then, never when a row is merely on disk. At most
``DRAIN_WINDOW`` drained records wait for Kafka at once. When the drain has
handed over every row, the records put since but not yet written are taken
back from the buffer and queued in the sender behind the drained ones, and
the path is direct again: a device's records still reach Kafka in order, and
the steady state writes nothing to disk.

A bridge killed with rows in its buffer starts with the buffer engaged and
drains it first. Rows whose events the dedupe window knows are in Kafka
(seeded from the data topic's tail at start: the crash came after Kafka
acknowledged them and before their rows were deleted) are deleted and
receipted again instead of being sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time

from reflexarc.aio import cancel_and_wait
from reflexarc.fog.buffer import DiskBuffer
from reflexarc.fog.config import BufferSettings
from reflexarc.fog.dedupe import DedupeWindow
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import AckQueue, KafkaSender, Record

log = logging.getLogger(__name__)

#: drained records handed to the sender and not yet acknowledged by Kafka, at most (count, value bytes):
#: enough to keep every partition's batch full, little enough that an outage costs no memory
DRAIN_WINDOW = 2000
DRAIN_WINDOW_BYTES = 2 << 20
#: rows read from the buffer at once
DRAIN_CHUNK = 500


class Mode(enum.Enum):
    """Where the intake's records go."""

    DIRECT = "direct"
    BUFFERED = "buffered"


class Spill:
    """The intake's outlet (``try_send``/``send``): the sender directly, or the disk buffer while Kafka lags."""

    def __init__(
        self,
        sender: KafkaSender,
        buffer: DiskBuffer,
        settings: BufferSettings,
        metrics: BridgeMetrics,
        dedupe: DedupeWindow | None = None,
        receipts: Receipts | None = None,
        ready: asyncio.Event | None = None,
    ) -> None:
        self.sender = sender
        self.buffer = buffer
        self.metrics = metrics
        self.dedupe = dedupe
        self.receipts = receipts
        self.spill_after_s = settings.spill_after_ms / 1000.0
        self.mode = Mode.DIRECT
        # Set once Kafka can be used (a bridge may start while Kafka is away: it buffers until then).
        self._ready = ready
        buffer.on_durable = self._durable
        # Rows whose records the sender already has (copies of what it held at engagement).
        self._skip: set[int] = set()
        #: the highest row handed to the sender (or skipped)
        self.cursor = 0
        # Drained rows in the sender, not yet acknowledged by Kafka (and their value bytes).
        self._handed: set[int] = set()
        self._handed_bytes = 0
        self._mean_size = 1024.0
        # Records with a row (copies and drained) in the sender: nothing to look at in on_sent while 0.
        self._with_rows = 0
        self._acked = asyncio.Event()
        self._engaged = asyncio.Event()
        self._set_mode(Mode.DIRECT)
        self._task: asyncio.Task[None] | None = None
        self.engagements = 0
        self.drained = 0
        metrics.buffer_engaged.set_function(lambda: 1 if self.mode is Mode.BUFFERED else 0)
        metrics.buffer_depth.set_function(lambda: buffer.depth)
        metrics.buffer_bytes.set_function(lambda: buffer.bytes)
        metrics.buffer_oldest.set_function(buffer.oldest_age)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self, buffered: bool = False) -> None:
        """Start watching Kafka (draining first what a previous run left); ``buffered``: start engaged."""
        if self.buffer.depth:
            log.warning(
                "the disk buffer %s holds %d records from before: sending them first",
                self.buffer.path,
                self.buffer.depth,
            )
        if self.buffer.depth or buffered:
            # Not counted as an engagement: the drain finds nothing to send and goes direct at once.
            self._set_mode(Mode.BUFFERED)
        self._task = asyncio.create_task(self._run(), name="fog-spill")

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The long-running task (the bridge stops if it fails)."""
        return [self._task] if self._task is not None else []

    async def stop(self) -> None:
        """Stop draining (rows not acknowledged by Kafka stay in the buffer for the next start)."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    def _set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode is Mode.BUFFERED:
            self._engaged.set()
            self.try_send = self._try_send  # type: ignore[method-assign]  # swapped per mode: no branch per message
        else:
            self._engaged.clear()
            # The intake calls the sender's own try_send while direct: no extra call per message.
            self.try_send = self.sender.try_send  # type: ignore[method-assign]  # swapped per mode: no branch per message

    # ---- the intake's side -----------------------------------------------------------
    def try_send(self, rec: Record) -> bool:
        """Take ``rec`` now (False: ``await send(rec)``, the sender or the buffer has no room).

        Replaced per instance by the direct or the buffered variant whenever the mode changes.
        """
        return self.sender.try_send(rec) if self.mode is Mode.DIRECT else self._try_send(rec)

    def _try_send(self, rec: Record) -> bool:
        if self.buffer.full():
            return False
        self.buffer.put(rec)
        return True

    async def send(self, rec: Record) -> None:
        """Take ``rec``, waiting for room in the sender (direct) or on disk (buffered)."""
        while not self.try_send(rec):
            if self.mode is Mode.BUFFERED:
                # Full: the intake stops, and MQTT acks with it (backpressure, as without a buffer).
                await self.buffer.wait_space()
                continue
            # The sender has no room (or does not know the topic yet): wait for it, unless the buffer takes over.
            topic_known = self.sender.knows(rec.topic)
            waiter = asyncio.ensure_future(self.sender.wait_room() if topic_known else self.sender.learn(rec.topic))
            engaged = asyncio.ensure_future(self._engaged.wait())
            try:
                await asyncio.wait({waiter, engaged}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                engaged.cancel()

    def _durable(self, recs: list[Record]) -> None:
        """Rows committed: the MQTT messages of these records may be acknowledged."""
        self.metrics.buffer_spilled.inc(len(recs))
        owners: list[AckQueue] = []
        for rec in recs:
            for t in rec.tickets:
                t.holds -= 1
                if t.owner not in owners:
                    owners.append(t.owner)
            rec.tickets = ()
        for owner in owners:
            owner.settle()

    # ---- Kafka's side ----------------------------------------------------------------
    def sent(self, recs: list[Record]) -> None:
        """Kafka acknowledged ``recs`` (the sender's ``on_sent``): delete the rows of those that have one."""
        if not self._with_rows:
            return
        done = [r for r in recs if r.seq]
        if not done:
            return
        self._with_rows -= len(done)
        self.buffer.delete(done)
        handed = self._handed
        n = len(handed)
        for r in done:
            if r.seq in handed:
                handed.discard(r.seq)
                self._handed_bytes -= len(r.value or b"")
        n -= len(handed)
        if n:
            self.drained += n
            self.metrics.buffer_drained.inc(n)
            self._acked.set()

    # ---- the loop: watch Kafka while direct, drain while buffered -----------------------
    async def _run(self) -> None:
        if self._ready is not None:
            await self._ready.wait()
        while True:
            if self.mode is Mode.DIRECT:
                await self._watch()
            else:
                await self._drain()

    async def _watch(self) -> None:
        """Engage the buffer when Kafka keeps records waiting longer than ``spill_after_ms``."""
        interval = min(self.spill_after_s / 4, 0.1)
        while self.mode is Mode.DIRECT:
            await asyncio.sleep(interval)
            stalled = self.sender.stalled_for(time.monotonic())
            if stalled >= self.spill_after_s:
                why = "a batch failed" if stalled == float("inf") else f"records waited {stalled:.2f} s"
                self.engage(why)

    def engage(self, why: str) -> None:
        """Switch to the disk buffer: what the sender queued goes to disk, then every new record."""
        if self.mode is Mode.BUFFERED:
            return
        self._set_mode(Mode.BUFFERED)
        self.engagements += 1
        self.metrics.buffer_engagements.inc()
        put = self.buffer.put
        # Copies of everything the sender holds (on the wire and queued), so that their MQTT messages are
        # acknowledged once on disk. The sender keeps them, in order, and sends (or re-sends) them itself:
        # their rows are only for a crash; the drain skips them, and they are deleted when Kafka has them.
        held = [r for r in self.sender.records() if not r.seq and r.on_done is None]
        for r in held:
            self._skip.add(put(r))
        self._with_rows += len(held)
        log.warning(
            "Kafka is not keeping up (%s): taking MQTT traffic into the disk buffer %s "
            "(%d records were waiting for Kafka)",
            why,
            self.buffer.path,
            len(held),
        )

    async def _drain(self) -> None:
        """Hand rows to the sender in order; back to direct once every row is handed over."""
        await self._window()
        # Rows read at once: what the window has room for, by count and (at the recent mean size) by bytes.
        room = (DRAIN_WINDOW_BYTES - self._handed_bytes) // max(1, int(self._mean_size))
        limit = max(1, min(DRAIN_CHUNK, DRAIN_WINDOW - len(self._handed), room))
        rows, upto = await self.buffer.read(self.cursor, limit)
        if rows:
            self._mean_size = 0.8 * self._mean_size + 0.2 * sum(len(r.value or b"") for r in rows) / len(rows)
        for rec in rows:
            self.cursor = rec.seq
            if rec.seq in self._skip:
                self._skip.discard(rec.seq)
                continue
            if self._in_kafka(rec):
                continue
            await self._window()
            if not self.sender.try_send(rec):
                await self.sender.send(rec)
            self._handed.add(rec.seq)
            self._handed_bytes += len(rec.value or b"")
            self._with_rows += 1
        if len(rows) < limit:
            # Nothing unread up to ``upto``: rows between were deleted (their records were acknowledged).
            self.cursor = max(self.cursor, upto)
        if self._skip:
            self._skip = {s for s in self._skip if s > self.cursor}
        if len(rows) < limit and self._caught_up():
            return
        if not rows:
            # Every committed row is handed over: wait for new ones (or re-check Kafka's health soon).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.buffer.changed.wait(), 0.05)

    async def _window(self) -> None:
        """Wait while the drained records Kafka has not acknowledged fill the window."""
        while len(self._handed) >= DRAIN_WINDOW or self._handed_bytes >= DRAIN_WINDOW_BYTES:
            self._acked.clear()
            await self._acked.wait()

    def _in_kafka(self, rec: Record) -> bool:
        """True (and the row deleted, the events receipted) when every event of ``rec`` is known to be in Kafka."""
        dedupe = self.dedupe
        if dedupe is None or not rec.receipts:
            return False
        for entry in rec.receipts:
            if entry[3] is None or not dedupe.confirmed(entry[3]):
                return False
        self.buffer.delete([rec])
        # A duplicate after all (MQTT redelivered it to a restarted bridge before the data topic was read).
        self.metrics.duplicates.inc(len(rec.receipts))
        if self.receipts is not None:
            for entry in rec.receipts:
                self.receipts.again(entry)
        return True

    def _caught_up(self) -> bool:
        """Switch back to direct if every committed row is handed over and Kafka takes records again."""
        buf = self.buffer
        if buf.flushing or self.cursor < buf.committed_seq:
            return False
        if self.sender.stalled_for(time.monotonic()) >= self.spill_after_s / 2:
            return False
        if any(r.seq in self._skip or not self.sender.knows(r.topic) for r in buf.unwritten):
            return False
        # Put since the last read and not on disk yet: they go to Kafka from memory, behind the drained rows,
        # and their MQTT messages are acknowledged when Kafka has them (their tickets are still held).
        recs = buf.take_unwritten()
        for r in recs:
            self.sender.enqueue(r)
        self._skip.clear()
        self._set_mode(Mode.DIRECT)
        log.warning(
            "the disk buffer is drained: Kafka takes records directly again (%d handed over from memory)", len(recs)
        )
        return True
