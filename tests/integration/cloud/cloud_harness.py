"""Shared pieces of the cloud-tier integration tests: a worker process and Kafka helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from reflexarc.cloud.engine import TriggerEngine
from reflexarc.cloud.validate import load_triggers
from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.events import TaskRequest
from reflexarc.kafka import ensure_topics, make_consumer, make_producer, send_event
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TOPICS = Topics()
SITE_YAML = "site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n"


def header(bootstrap: str, key_file: Path | None = None, extra: str = "") -> str:
    """Top of a triggers file for a test broker."""
    lines = [
        "sites: [site.yaml]",
        f"kafka: {{bootstrap_servers: '{bootstrap}'}}",
        "worker: {session_timeout: 6s, reload_interval: 0.3s, commit_interval: 0.5s}",
    ]
    if key_file is not None:
        lines.append(f"signing_key_file: {key_file}")
    return "\n".join(lines) + "\n" + extra


def event(
    i: int | str, seconds: float, data: dict[str, Any], device: str, stream: str = "counts", site: str = "bl1"
) -> Envelope:
    """An instrument event at ``T0 + seconds``."""
    return Envelope.for_device(
        EventType.DATA, site, device, data, subject=stream, id=f"e{i}", time=T0 + timedelta(seconds=seconds)
    )


def engine_tasks(path: Path, events: list[Envelope]) -> dict[str, TaskRequest]:
    """The task requests the pure engine makes on ``events`` delivered once, by task id, in firing order.

    What a worker run on the same events must send (the engine is the same code).
    """
    engine = TriggerEngine(load_triggers(path))
    store: dict[str, Any] = {}
    tasks: dict[str, TaskRequest] = {}
    for pos, e in enumerate(events):
        out = engine.process(e, store, position=pos)
        store.update(out.states)
        for firing in out.firings:
            tasks.update((t.task_id, t) for t in firing.tasks)
    return tasks


class WorkerProcess(TierProcess):
    """``reflexarc cloud run FILE`` as a child process (dies with the test process), without a signing key."""

    def __init__(self, path: Path, log: Path) -> None:
        super().__init__("cloud", path, log)
        assert self.proc.env is not None
        self.proc.env.pop("RX_SIGNING_KEY", None)


async def prepare(settings: KafkaSettings) -> None:
    """Create the topics the tests use (as `reflexarc up` would)."""
    await ensure_topics(settings, [*TOPICS.kafka_core(), TOPICS.kafka_tasks("local")])


async def produce(settings: KafkaSettings, events: list[Envelope]) -> None:
    """Send events to the data topic and wait for the broker's acks."""
    producer = make_producer(settings)
    await producer.start()
    try:
        futs = [await send_event(producer, TOPICS.kafka_data, e) for e in events]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def produce_raw(
    settings: KafkaSettings,
    topic: str,
    value: bytes,
    headers: list[tuple[str, bytes]] | None = None,
    key: bytes | None = None,
) -> None:
    """Send one raw record."""
    producer = make_producer(settings)
    await producer.start()
    try:
        await (await producer.send(topic, value=value, key=key, headers=headers or []))
    finally:
        await producer.stop()


async def read_all(
    settings: KafkaSettings,
    topics: list[str],
    until: Callable[[list[Any]], bool],
    timeout: float = 60.0,
    settle: float = 0.0,
) -> list[Any]:
    """Read the topics from the beginning until ``until(records)`` holds (then ``settle`` s more)."""
    consumer = make_consumer(settings, *topics, group_id=None)
    await consumer.start()
    records: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settle_end: float | None = None
    try:
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
            if settle_end is None and until(records):
                settle_end = loop.time() + settle
            if settle_end is not None and loop.time() >= settle_end:
                return records
        return records
    finally:
        await consumer.stop()
