"""Unit tests of the batched sender's partitioning (against aiokafka's own partitioner)."""

from __future__ import annotations

import asyncio
import random

from aiokafka.partitioner import DefaultPartitioner

from reflexarc.fog.sender import PartitionMap, partition_for_key


def test_fog_partition_for_key_matches_aiokafka_default_partitioner() -> None:
    rng = random.Random(7)
    partitioner = DefaultPartitioner()
    keys = [b"", b"a", b"dev-1", "gerät-ü".encode()] + [rng.randbytes(rng.randrange(0, 40)) for _ in range(2000)]
    for n in (1, 2, 3, 6, 12, 64):
        parts = list(range(n))
        for key in keys:
            assert partition_for_key(key, parts) == partitioner(key, parts, parts), (key, n)


def test_fog_partition_map_caches_and_follows_partition_changes() -> None:
    pm = PartitionMap()
    assert not pm.known("t")
    pm.set_partitions("t", {2, 0, 1})
    partitioner = DefaultPartitioner()
    for i in range(200):
        key = f"device-{i}".encode()
        assert pm.partition("t", key) == partitioner(key, [0, 1, 2], [0, 1, 2])
        assert pm.partition("t", key) == partitioner(key, [0, 1, 2], [0, 1, 2])  # cached path
    pm.set_partitions("t", range(5))
    for i in range(200):
        key = f"device-{i}".encode()
        assert pm.partition("t", key) == partitioner(key, list(range(5)), list(range(5)))
    assert pm.partition("t", None) in range(5)


class _Cluster:
    """Stands in for aiokafka's ClusterMetadata: only the listener hooks the sender uses."""

    def add_listener(self, cb: object) -> None:
        """Accept a listener (the fake never changes metadata)."""

    def remove_listener(self, cb: object) -> None:
        """Drop a listener."""


class _FlakyProducer:
    """A producer whose first ``fail`` batches time out; records what Kafka 'took', in order."""

    def __init__(self, fail: int) -> None:
        from types import SimpleNamespace

        self.client = SimpleNamespace(cluster=_Cluster())
        self.fail = fail
        self.took: list[tuple[int, bytes]] = []
        self.batches: list[int] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> object:
        from aiokafka.producer.message_accumulator import BatchBuilder

        return BatchBuilder(2048, 0)

    async def send_batch(self, batch: object, topic: str, *, partition: int) -> asyncio.Future[None]:
        from aiokafka.errors import KafkaTimeoutError
        from aiokafka.record.default_records import DefaultRecordBatch

        await asyncio.sleep(0.001)
        if self.fail > 0:
            self.fail -= 1
            raise KafkaTimeoutError()
        buf = batch._build()  # type: ignore[attr-defined]
        recs = list(DefaultRecordBatch(bytes(buf)))
        self.batches.append(len(recs))
        self.took.extend((partition, r.value) for r in recs)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def test_fog_sender_batches_keep_order_and_ack_only_after_kafka_took_them() -> None:
    from reflexarc.fog.metrics import BridgeMetrics
    from reflexarc.fog.sender import AckQueue, KafkaSender, Record
    from reflexarc.mqtt import MqttMessage

    producer = _FlakyProducer(fail=2)
    acked: list[int] = []
    aq = AckQueue(lambda m: acked.append(m.mid))
    sender = KafkaSender(producer, BridgeMetrics("unit-batch"), max_in_flight=50, retry_backoff_s=0.01)  # type: ignore[arg-type]
    sender.start()
    keys = [f"dev-{i}".encode() for i in range(4)]
    for i in range(400):
        t = aq.new(MqttMessage("t", b"", 1, i + 1))
        AckQueue.hold(t)  # the record's hold, as the ingest adds it
        await sender.send(Record("data", keys[i % 4], f"{i:04d}".encode() + b"x" * 100, [], [t]))
        aq.release(t)
        # Nothing is acknowledged to MQTT before Kafka took it.
        assert len(acked) <= len(producer.took)
    assert await sender.wait_idle(10)
    await sender.close()
    assert acked == list(range(1, 401))
    assert sorted(v for _, v in producer.took) == sorted(f"{i:04d}".encode() + b"x" * 100 for i in range(400))
    # Per key (device) order kept across the failed and re-sent batches.
    for k in range(4):
        p = partition_for_key(keys[k], [0, 1, 2])
        seen = [int(v[:4]) for part, v in producer.took if part == p and int(v[:4]) % 4 == k]
        assert seen == list(range(k, 400, 4))
    assert max(producer.batches) > 1, "records were never batched"
