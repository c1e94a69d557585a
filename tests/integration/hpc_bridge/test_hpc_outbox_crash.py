"""The outbox publisher stopped between sending a page and marking it (SIGKILL, or a clean stop): nothing is sent twice.

A child process records jobs (their ``queued`` states wait in the outbox),
publishes one page and kills itself with SIGKILL the moment Kafka has
acknowledged it. The next publisher finds those events on Kafka
(``settle``), publishes only the rest, and every event is on Kafka once.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kafka_tally import event_id, read_all

from reflexarc.config import KafkaSettings
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.outbox import OutboxPublisher
from reflexarc.kafka import ensure_topics, make_producer
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N = 300
PAGE = 100

CHILD = textwrap.dedent("""
    import asyncio, os, signal, sys
    from reflexarc.config import KafkaSettings
    from reflexarc.events import TaskRequest
    from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
    from reflexarc.hpc_bridge.service.outbox import OutboxPublisher
    from reflexarc.hpc_bridge.store import NewJob
    from reflexarc.kafka import make_producer
    from reflexarc.topics import Topics

    url, servers, n, page = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def main() -> None:
        kafka = KafkaSettings(bootstrap_servers=servers)
        jobs = await AsyncJobStore.open(url, "s", Topics())
        await jobs.create([NewJob(TaskRequest(task_id=f"t{i}", app="a", site="s")) for i in range(n)])
        producer = make_producer(kafka)
        await producer.start()
        publisher = OutboxPublisher(jobs, producer, kafka, "s", page=page)
        send = publisher._send

        async def send_then_die(rows):
            await send(rows)  # every record of the page acknowledged by Kafka (acks=all)
            os.kill(os.getpid(), signal.SIGKILL)  # before the page is marked published

        publisher._send = send_then_die
        await publisher.run()

    asyncio.run(main())
""")


async def event_ids(kafka: KafkaSettings, topic: str) -> Counter[str]:
    """Every CloudEvent id on ``topic``, counted."""
    return Counter(i for r in await read_all(kafka, [topic]) if (i := event_id(r)) is not None)


def assert_each_queued_state_once(seen: Counter[str]) -> None:
    """The ``queued`` state of every job is on Kafka, each exactly once."""
    assert set(seen) == {f"t{i}.1" for i in range(N)}
    assert set(seen.values()) == {1}, {i: c for i, c in seen.items() if c > 1}


@contextlib.asynccontextmanager
async def publisher_of(url: str, kafka: KafkaSettings) -> AsyncIterator[tuple[AsyncJobStore, OutboxPublisher]]:
    """The job store at ``url`` and an outbox publisher on it, as the agent wires them."""
    jobs = await AsyncJobStore.open(url, "s", Topics())
    producer = make_producer(kafka)
    await producer.start()
    try:
        publisher = OutboxPublisher(jobs, producer, kafka, "s", page=PAGE)
        jobs.on_written = publisher.offer
        yield jobs, publisher
    finally:
        await producer.stop()
        await jobs.close()


async def test_events_acknowledged_before_a_kill_are_not_sent_again(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    topics = Topics()
    await ensure_topics(kafka_settings, [topics.kafka_jobs, topics.kafka_results])
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, kafka_settings.bootstrap_servers, str(N), str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr  # it died by SIGKILL, after the first page's acks
    assert sum((await event_ids(kafka_settings, topics.kafka_jobs)).values()) == PAGE

    async with publisher_of(url, kafka_settings) as (jobs, publisher):
        await publisher.settle()
        assert len(await jobs.call(lambda b: b.pending_events(10 * N))) == N - PAGE
        await publisher.flush()
        assert await jobs.call(lambda b: b.pending_events(10 * N)) == []
    assert_each_queued_state_once(await event_ids(kafka_settings, topics.kafka_jobs))


async def test_a_clean_stop_in_the_middle_of_a_page_sends_nothing_twice(
    tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reflexarc.events import TaskRequest
    from reflexarc.hpc_bridge.store import NewJob

    topics = Topics()
    await ensure_topics(kafka_settings, [topics.kafka_jobs])
    async with publisher_of(f"sqlite:///{tmp_path / 'jobs.db'}", kafka_settings) as (jobs, publisher):
        await jobs.create([NewJob(TaskRequest(task_id=f"t{i}", app="a", site="s")) for i in range(N)])
        sending = asyncio.Event()
        send = publisher._send

        async def send_and_tell(rows: list[Any]) -> None:
            sending.set()
            await send(rows)

        monkeypatch.setattr(publisher, "_send", send_and_tell)
        running = asyncio.create_task(publisher.run())
        await sending.wait()
        publisher.stop()  # as the agent does at SIGTERM: the page in flight is finished, not dropped
        await asyncio.wait_for(running, 30)
        await publisher.flush()
    assert_each_queued_state_once(await event_ids(kafka_settings, topics.kafka_jobs))
