"""The worker's batch discipline, with a stand-in consumer and producer: nothing committable before it is durable.

Order per batch: every request acked, then each changed device's state written
once and acked, then the offsets become committable. A revocation waits for
the batch in progress; records of a partition still recovering are read again.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import ValidationError

from reflexarc.cloud.model import WorkerSettings
from reflexarc.cloud.state import StateStore
from reflexarc.cloud.validate import load_triggers
from reflexarc.cloud.worker import TriggerWorker
from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope, EventType

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TRIGGERS = """sites: [site.yaml]
kafka: {bootstrap_servers: '127.0.0.1:9'}
triggers:
  - name: three
    on: bl1/+/counts
    window: {type: tumbling, events: 3, emit: close, aggregates: {s: {op: sum, of: event.data.v}}}
    when: "true"
    then: [{task: {app: fit, args: {s: agg.s}}}]
"""
DATA0 = TopicPartition("rx.data", 0)


class Producer:
    """Records every send; each ack is a future the test resolves."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, asyncio.Future[Any]]] = []

    async def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key, fut))
        return fut

    def ack(self, topic_prefix: str) -> int:
        n = 0
        for topic, _, fut in self.sent:
            if topic.startswith(topic_prefix) and not fut.done():
                fut.set_result(SimpleNamespace(offset=0))
                n += 1
        return n


class Consumer:
    """Assignment, seeks and commits, as the worker uses them."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


def record(offset: int, i: int, device: str = "d1") -> Any:
    env = Envelope.for_device(
        EventType.DATA, "bl1", device, {"v": i}, subject="counts", id=f"e{i}", time=T0 + timedelta(seconds=i)
    )
    key, value, headers = env.to_kafka()
    return SimpleNamespace(topic="rx.data", partition=0, offset=offset, key=key, value=value, headers=headers)


def worker(tmp_path: Path) -> tuple[TriggerWorker, Producer, Consumer]:
    (tmp_path / "site.yaml").write_text("site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n")
    (tmp_path / "triggers.yaml").write_text(TRIGGERS)
    w = TriggerWorker(load_triggers(tmp_path / "triggers.yaml"), KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    producer, consumer = Producer(), Consumer({DATA0})
    w.producer, w.consumer = producer, consumer
    w.store = StateStore(w.kafka, w.changelog, producer)
    w.store.partitions[0] = {}
    return w, producer, consumer


async def _until(cond: Any) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_offsets_are_committable_only_after_requests_then_state_are_acked(tmp_path: Path) -> None:
    w, producer, _ = worker(tmp_path)
    batch = {DATA0: [record(10 + i, i) for i in range(4)]}  # e0..e2 close a window: one task
    task = asyncio.create_task(w._process(batch))
    await _until(lambda: len(producer.sent) == 1)
    assert producer.sent[0][0] == "rx.tasks.local"
    await asyncio.sleep(0.01)
    # The state is not written while the request is not acked; nothing committable either.
    assert len(producer.sent) == 1 and w._committable == {}
    producer.ack("rx.tasks")
    await _until(lambda: len(producer.sent) == 2)
    topic, key, _ = producer.sent[1]
    assert topic == w.changelog and key == b"bl1/d1"  # one state write for the device, for four events
    await asyncio.sleep(0.01)
    assert w._committable == {} and not task.done()
    producer.ack(w.changelog)
    await task
    assert w._committable == {DATA0: 14}
    assert w.processed == 4


async def test_a_failed_request_fails_the_batch_and_commits_nothing(tmp_path: Path) -> None:
    w, producer, _ = worker(tmp_path)
    task = asyncio.create_task(w._process({DATA0: [record(i, i) for i in range(3)]}))
    await _until(lambda: len(producer.sent) == 1)
    producer.sent[0][2].set_exception(RuntimeError("broker gone"))
    with pytest.raises(RuntimeError, match="broker gone"):
        await task
    assert w._committable == {} and len(producer.sent) == 1  # no state written for it


async def test_records_of_a_partition_still_recovering_are_read_again(tmp_path: Path) -> None:
    w, producer, consumer = worker(tmp_path)
    assert w.store is not None
    del w.store.partitions[0]
    await w._process({DATA0: [record(7, 0), record(8, 1)]})
    assert consumer.seeks == [(DATA0, 7)] and producer.sent == [] and w._committable == {} and w.processed == 0


async def test_revocation_waits_for_the_batch_and_commits_only_what_is_durable(tmp_path: Path) -> None:
    w, producer, consumer = worker(tmp_path)
    w._committable = {DATA0: 3}

    async def batch() -> None:
        async with w._batch_lock:
            await w._process({DATA0: [record(3 + i, i) for i in range(3)]})

    running = asyncio.create_task(batch())
    await _until(lambda: len(producer.sent) == 1)
    revoking = asyncio.create_task(w._revoked({DATA0}))
    await asyncio.sleep(0.01)
    assert not revoking.done() and consumer.commits == []  # waits for the batch in progress
    producer.ack("rx.tasks")
    await _until(lambda: len(producer.sent) == 2)
    producer.ack(w.changelog)
    await running
    await revoking
    assert consumer.commits == [{DATA0: 6}]
    assert 0 not in w.store and w._committable == {}  # type: ignore[operator]
    # Given straight back, the partition keeps its state without reading the changelog.
    await w._assigned({DATA0})
    assert w.store is not None and "bl1/d1" in w.store.devices(0)
    assert len(producer.sent) == 2  # no recovery marker was written


def test_a_bundle_is_json_that_reads_back_the_same(tmp_path: Path) -> None:
    from reflexarc.cloud.state import encode

    bundle = {
        "t\x1fbl1/d1": {
            "fp": "x",
            "win": {"ts": [1.5, 2.0], "cols": [[1, None]], "ids": {"e1": [1.5, 7]}},
            "pos": 4,
            "big": 2**70,
            "f": 0.1,
        }
    }
    assert json.loads(encode(bundle)) == bundle


def test_worker_settings_defaults_and_bounds() -> None:
    s = WorkerSettings()
    assert s.fetch_wait == 0.01 and s.max_batch == 2000 and s.commit_interval == 1.0
    assert WorkerSettings(fetch_wait="20ms").fetch_wait == pytest.approx(0.02)
    for bad in ({"fetch_wait": "1ms"}, {"fetch_wait": "10s"}, {"max_batch": 0}, {"max_batch": 10**6}):
        with pytest.raises(ValidationError):
            WorkerSettings(**bad)
