"""Unit tests of the switch between the direct path and the disk buffer (a stand-in producer, a real buffer)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from reflexarc.fog.buffer import DiskBuffer
from reflexarc.fog.config import BufferSettings, ReceiptSettings
from reflexarc.fog.dedupe import DedupeWindow, dedupe_key
from reflexarc.fog.metrics import BridgeMetrics
from reflexarc.fog.receipts import Receipts
from reflexarc.fog.sender import AckQueue, KafkaSender, Record, partition_for_key
from reflexarc.fog.spill import Mode, Spill
from reflexarc.mqtt import MqttMessage
from reflexarc.topics import Topics

KEYS = [f"s1/d{i}".encode() for i in range(4)]
PARTS = [0, 1, 2]


class _Cluster:
    def add_listener(self, cb: object) -> None:
        """The fake's metadata never changes."""

    def remove_listener(self, cb: object) -> None:
        """Nothing to remove."""


class PausableProducer:
    """A producer that takes batches at once, or, while paused (Kafka frozen), answers them only when it
    continues (the broker then processes what waited) or fails them after ``timeout_s`` (the request timeout)."""

    def __init__(self, timeout_s: float = 0.2) -> None:
        self.client = SimpleNamespace(cluster=_Cluster())
        self.timeout_s = timeout_s
        self.paused = False
        self._resumed = asyncio.Event()
        self.took: list[tuple[int, bytes]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return set(PARTS)

    def create_batch(self) -> object:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(2048, 0)

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    async def send_batch(self, batch: object, topic: str, *, partition: int) -> asyncio.Future[None]:
        from aiokafka.errors import KafkaTimeoutError
        from aiokafka.record.default_records import DefaultRecordBatch

        values = [r.value for r in DefaultRecordBatch(bytes(batch._build()))]  # type: ignore[attr-defined]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def answer() -> None:
            if self.paused:
                try:
                    await asyncio.wait_for(self._resumed.wait(), self.timeout_s)
                except TimeoutError:
                    fut.set_exception(KafkaTimeoutError())
                    return
            self.took.extend((partition, v) for v in values)
            fut.set_result(None)

        asyncio.get_running_loop().create_task(answer())
        return fut


class Harness:
    """Intake -> spill -> sender -> producer, with the bridge's wiring (receipts, row deletes)."""

    def __init__(self, tmp: Path, name: str, spill_after_ms: float = 50.0) -> None:
        self.producer = PausableProducer()
        self.metrics = BridgeMetrics(name)
        self.sender = KafkaSender(self.producer, self.metrics, retry_backoff_s=0.01)  # type: ignore[arg-type]
        self.dedupe = DedupeWindow(100_000, 600)
        self.receipts = Receipts(ReceiptSettings(), Topics(), self.metrics, self.dedupe)
        self.buffer = DiskBuffer(tmp / f"{name}.db", max_events=100_000, max_bytes=1 << 30)
        self.spill = Spill(
            self.sender,
            self.buffer,
            BufferSettings(spill_after_ms=spill_after_ms),
            self.metrics,
            self.dedupe,
            self.receipts,
        )
        self.acked: list[int] = []
        self.aq = AckQueue(lambda m: self.acked.append(m.mid))
        self.n = 0

        def on_sent(recs: list[Record]) -> None:
            self.receipts.confirmed(recs)
            self.spill.sent(recs)

        self.sender.on_sent = on_sent

    async def start(self) -> None:
        self.sender.start()
        await self.buffer.open()
        self.spill.start()

    async def stop(self) -> None:
        await self.spill.stop()
        await self.sender.close()
        await self.buffer.close()

    async def take(self, count: int) -> None:
        """What the ingest does for ``count`` messages: a ticket each, a record on the outlet, the ticket released."""
        for _ in range(count):
            self.n += 1
            i = self.n
            key = KEYS[i % 4]
            t = self.aq.new(MqttMessage("t", b"", 1, i))
            t.holds += 1
            eid = f"e-{i}"
            rec = Record(
                "rx.data",
                key,
                f"{i:06d}".encode(),
                [("ce_id", eid.encode())],
                (t,),
                (("s1", key.decode()[3:], eid, dedupe_key("src", eid)),),
            )
            assert not self.dedupe.seen(dedupe_key("src", eid))
            if not self.spill.try_send(rec):
                await self.spill.send(rec)
            self.aq.release(t)

    async def until(self, cond: object, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.005)

    def check_kafka(self) -> None:
        """Every record once, and each key's records in order."""
        seqs = [int(v) for _, v in self.producer.took]
        assert sorted(seqs) == list(range(1, self.n + 1)), "every record in Kafka exactly once"
        for k, key in enumerate(KEYS):
            p = partition_for_key(key, PARTS)
            mine = [int(v) for part, v in self.producer.took if part == p and int(v) % 4 == k]
            assert mine == sorted(mine), f"order of {key!r} broken"


async def test_fog_spill_engages_acks_from_disk_drains_in_order_and_goes_direct_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, "unit-spill-1")
    await h.start()
    try:
        await h.take(300)
        await h.until(lambda: len(h.acked) == 300)
        assert h.spill.mode is Mode.DIRECT and h.buffer.spilled == 0, "the steady state writes nothing to disk"

        h.producer.pause()  # Kafka frozen
        await h.take(3000)
        # The buffer took over: every MQTT message is acknowledged although Kafka took none of them.
        await h.until(lambda: len(h.acked) == 3300)
        assert len(h.producer.took) == 300 and h.spill.mode is Mode.BUFFERED and h.spill.engagements == 1
        assert h.buffer.depth >= 3000 - 50
        assert h.receipts.waiting == 300, "no receipt for what is only on disk"

        h.producer.resume()
        await h.until(lambda: len(h.producer.took) >= 3300 and h.spill.mode is Mode.DIRECT)
        await h.until(lambda: h.buffer.depth == 0)
        h.check_kafka()
        assert h.receipts.waiting == 3300 and h.dedupe.pending == 0, "receipts once Kafka has them"

        spilled = h.buffer.spilled
        await h.take(500)
        await h.until(lambda: len(h.producer.took) == 3800 and len(h.acked) == 3800)
        assert h.buffer.spilled == spilled and h.spill.mode is Mode.DIRECT
        h.check_kafka()
    finally:
        await h.stop()


async def test_fog_spill_keeps_order_when_kafka_flaps_during_the_drain(tmp_path: Path) -> None:
    """Kafka freezes again while the buffer drains, and right after the path went direct again."""
    h = Harness(tmp_path, "unit-spill-2", spill_after_ms=20)
    await h.start()
    try:
        for r in range(5):
            h.producer.pause()
            await h.take(200)
            await h.until(lambda: h.spill.mode is Mode.BUFFERED)
            await h.take(300)
            h.producer.resume()
            drained = h.spill.drained
            await h.take(100)
            if r % 2 == 0:
                # Frozen again mid-drain: drained records are on their way, new ones on disk.
                await h.until(lambda d=drained: h.spill.drained > d or h.spill.mode is Mode.DIRECT)
            else:
                # Frozen again just after going direct: drained records may still be in the sender.
                await h.until(lambda: h.spill.mode is Mode.DIRECT)
                await h.take(50)
        # The MQTT acks of the last batch settle after Kafka's ack: wait for them too (a lost ack still fails).
        await h.until(
            lambda: (
                len(h.producer.took) >= h.n
                and h.buffer.depth == 0
                and h.spill.mode is Mode.DIRECT
                and len(h.acked) >= h.n
            ),
            timeout=30,
        )
        assert len(h.acked) == h.n
        h.check_kafka()
        assert h.spill.engagements >= 3
    finally:
        await h.stop()


async def test_fog_spill_resumes_a_buffer_left_by_a_crash_without_resending_what_kafka_has(tmp_path: Path) -> None:
    # A previous run left 100 rows; Kafka had acknowledged the first 30 before the crash.
    path = tmp_path / "unit-spill-3.db"
    old = DiskBuffer(path, max_events=1000, max_bytes=1 << 20)
    await old.open()
    for i in range(1, 101):
        eid = f"e-{i}"
        old.put(
            Record(
                "rx.data", KEYS[i % 4], f"{i:06d}".encode(), [], (), (("s1", f"d{i % 4}", eid, dedupe_key("src", eid)),)
            )
        )
    await old.close()

    h = Harness(tmp_path, "unit-spill-3")
    await h.buffer.open()
    h.dedupe.seed(await h.buffer.recent_keys(1000), confirmed=False)
    h.dedupe.seed([(dedupe_key("src", f"e-{i}"), 1.0) for i in range(1, 31)], confirmed=True)  # the data topic's tail
    h.sender.start()
    h.spill.start()
    try:
        assert h.spill.mode is Mode.BUFFERED, "starts by draining what is left"
        await h.until(lambda: h.buffer.depth == 0 and h.spill.mode is Mode.DIRECT)
        assert sorted(int(v) for _, v in h.producer.took) == list(range(31, 101))
        assert h.receipts.waiting == 100, "what Kafka had is receipted again, the rest once sent"
    finally:
        await h.stop()


class FreezingProducer(PausableProducer):
    """Like a SIGSTOPped broker: a request sent while frozen times out for the client, and the broker still
    writes it when it continues (so a blind resend would write it twice)."""

    def __init__(self, timeout_s: float = 0.1) -> None:
        super().__init__(timeout_s)
        self.log: dict[int, list[bytes]] = {p: [] for p in PARTS}
        # Requests that timed out for the client while frozen, in arrival order: written the moment the broker
        # continues, before it answers anything later (a read-back included), as a broker works off its socket.
        self._backlog: list[Any] = []

    def resume(self) -> None:
        backlog, self._backlog = self._backlog, []
        for write in backlog:
            write()
        super().resume()

    async def send_batch(self, batch: object, topic: str, *, partition: int) -> asyncio.Future[None]:
        from aiokafka.errors import KafkaTimeoutError
        from aiokafka.record.default_records import DefaultRecordBatch

        values = [r.value for r in DefaultRecordBatch(bytes(batch._build()))]  # type: ignore[attr-defined]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def write() -> int:
            base = len(self.log[partition])
            self.log[partition].extend(values)
            self.took.extend((partition, v) for v in values)
            return base

        async def answer() -> None:
            if self.paused:
                try:
                    await asyncio.wait_for(asyncio.shield(self._resumed.wait()), self.timeout_s)
                except TimeoutError:
                    fut.set_exception(KafkaTimeoutError())
                    if self.paused:
                        self._backlog.append(write)  # processed when the broker continues: nobody is told
                        return
                    write()  # it continued meanwhile
                    return
            fut.set_result(SimpleNamespace(offset=write()))

        asyncio.get_running_loop().create_task(answer())
        return fut


class ReadBack:
    """The sender's Landed, on the fake broker's log: None while it is frozen."""

    def __init__(self, producer: FreezingProducer) -> None:
        self.producer = producer
        self.calls = 0

    async def find(
        self, topic: str, partition: int, start: int, recs: Any, since_ms: int = 0
    ) -> tuple[list[Record], int] | None:
        self.calls += 1
        if self.producer.paused:
            return None
        log = self.producer.log[partition][max(start, 0) :]
        there = [r for r in recs if r.value in log]
        return there, len(self.producer.log[partition])


@pytest.mark.parametrize("read_back", [False, True])
async def test_fog_sender_does_not_resend_what_a_frozen_broker_wrote_later(read_back: bool) -> None:
    """Without reading back, the timed-out attempts end up in Kafka twice (the test's control); with it, never."""
    producer = FreezingProducer()
    sender = KafkaSender(producer, BridgeMetrics(f"unit-landed-{read_back}"), retry_backoff_s=0.01)  # type: ignore[arg-type]
    reader = ReadBack(producer)
    if read_back:
        sender.landed = reader
    sender.start()
    values = [f"{i:06d}".encode() for i in range(1, 301)]
    for i, v in enumerate(values[:100]):
        await sender.send(Record("rx.data", KEYS[i % 4], v, []))
    assert await sender.wait_idle(5)  # acknowledged: the partitions have offsets to read back from
    producer.pause()
    for i, v in enumerate(values[100:]):
        await sender.send(Record("rx.data", KEYS[i % 4], v, []))
    await asyncio.sleep(0.3)  # a few attempts time out meanwhile (0.1 s each)
    producer.resume()
    assert await sender.wait_idle(10)
    await sender.close()
    seqs = [int(v) for _, v in producer.took]
    assert set(seqs) == set(range(1, 301))
    dups = len(seqs) - len(set(seqs))
    if read_back:
        assert dups == 0, f"{dups} records written twice"
        assert reader.calls > 0
    else:
        assert dups > 0, "the frozen broker should have written the timed-out attempts too"
