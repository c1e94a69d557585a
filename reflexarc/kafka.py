"""aiokafka clients configured the reflexarc way: durable producers, manual commits, explicit topics.

* Producers use ``acks="all"``: a send completes only when the record is
  durably in the cluster, which is when a hop may acknowledge upstream.
* Consumers never auto-commit: an offset is committed after the work it
  stands for is done (at-least-once; every consumer deduplicates on event id).
* Topics are created explicitly with a known partition count (some brokers
  auto-create with defaults that break co-partitioning).

Idempotent producers and transactions are not required anywhere, so any
Kafka-protocol broker works (Tansu does not support them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope

log = logging.getLogger(__name__)


def security_options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka's security arguments (protocol, TLS context, SASL) for ``settings``; the password comes from the environment."""
    opts: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        tls = settings.tls
        ctx = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        if tls and tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        opts["ssl_context"] = ctx
    if settings.sasl_mechanism:
        opts["sasl_mechanism"] = settings.sasl_mechanism
        opts["sasl_plain_username"] = settings.username
        opts["sasl_plain_password"] = settings.password()
    return opts


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer whose sends complete only when the cluster has the record durably."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30000,
        **security_options(settings),
    }
    opts.update(overrides)
    return AIOKafkaProducer(**opts)


def make_consumer(settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer with manual commits, starting at the earliest offset of a new group."""
    opts: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # Group joins take about half the session timeout on small brokers.
        "session_timeout_ms": 10000,
        "heartbeat_interval_ms": 1000,
        "max_poll_interval_ms": 300000,
        # How long a fetch may wait for data. Some brokers (Tansu) re-check a
        # multi-partition fetch only at halving intervals of this wait, so
        # aiokafka's 500 ms default adds up to 250 ms per hop; a short wait
        # costs empty fetches while idle (see KafkaSettings.fetch_max_wait_ms).
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        **security_options(settings),
    }
    opts.update(overrides)
    return AIOKafkaConsumer(*topics, **opts)


def make_admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    """An (unstarted) admin client for ``settings``, with its TLS/SASL options."""
    return AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **security_options(settings))


async def partition_count(settings: KafkaSettings, topic: str) -> int:
    """How many partitions ``topic`` has; raise RuntimeError if the cluster cannot tell."""
    admin = make_admin(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for t in described:
        if t.get("topic") == topic and t.get("partitions"):
            return len(t["partitions"])
    raise RuntimeError(f"cannot read the partitions of Kafka topic {topic}: {described!r}")


async def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], partitions: int | None = None, timeout: float = 30.0
) -> None:
    """Create the topics that do not exist yet (idempotent); retry while the cluster starts."""
    wanted = list(dict.fromkeys(topics))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        admin = make_admin(settings)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                new = [NewTopic(t, partitions or settings.partitions, settings.replication_factor) for t in missing]
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(new)
                log.info("created Kafka topics %s", missing)
            return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"cannot create Kafka topics on {settings.bootstrap_servers}: {exc}") from exc
            await asyncio.sleep(0.5)
        finally:
            await admin.close()


async def send_event(
    producer: AIOKafkaProducer, topic: str, event: Envelope, key: bytes | None = None
) -> asyncio.Future[Any]:
    """Queue one event in Kafka binary mode; await the returned future for the broker's ack."""
    k, value, headers = event.to_kafka(key)
    ack: asyncio.Future[Any] = await producer.send(topic, value=value, key=k, headers=headers)
    return ack


def event_of(record: Any) -> Envelope:
    """Read a consumed record (aiokafka ``ConsumerRecord``) as an :class:`Envelope`."""
    return Envelope.from_kafka(record.value, record.headers, record.key)


async def read_to_end(settings: KafkaSettings, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every record of ``topic`` now in the cluster, each partition's in offset order (none if it does not exist).

    Reads each partition until its fetch position reaches the high watermark
    the fetch responses report: some brokers (Tansu) answer ``end_offsets``
    with the first offset of the last batch, which would miss its other
    records. Raises ``TimeoutError`` if a partition is not read to its end in
    ``timeout`` seconds.
    """
    from aiokafka import TopicPartition

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        # Exact for an empty partition on every broker; only a lower bound otherwise (see above).
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > begins[tp]}
        for tp in todo:
            consumer.seek(tp, begins[tp])
        found: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        deadline = asyncio.get_running_loop().time() + timeout
        while todo:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"{topic}: partitions {sorted(tp.partition for tp in todo)} not read to their "
                    f"end within {timeout:.0f} s"
                )
            batch = await consumer.getmany(*todo, timeout_ms=200, max_records=10_000)
            for tp, records in batch.items():
                found[tp.partition].extend(records)
            for tp in list(todo):
                hw = consumer.highwater(tp)
                if hw is not None and await consumer.position(tp) >= hw:
                    todo.discard(tp)
        return [r for p in sorted(found) for r in found[p]]
    finally:
        await consumer.stop()
