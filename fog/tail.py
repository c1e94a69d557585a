"""The tail of the data topic: the events Kafka already holds, to seed a restarted bridge's dedupe window.

A bridge killed after Kafka acknowledged some records but before the
broker got its MQTT acknowledgements is sent those messages again when it
comes back. Its dedupe window was in memory; reading the newest records of
``{ns}.data`` at start (their ``ce_source`` + ``ce_id`` headers, and the ids
inside shaped batch records) tells the new window what Kafka has, so the
redeliveries are dropped (and receipted) instead of written twice.

Bounded: at most ``max_records`` per partition and ``max_age_s`` back (the
dedupe window's own bounds), for at most ``timeout_s``. Several bridges of a
shared subscription each read the whole tail: any of them may be sent any
device's redeliveries.

Some brokers (Tansu) answer ``end_offsets`` with the first offset of the
last batch, so the end is found by reading until the fetch position reaches
the high watermark the fetch responses report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiokafka import TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.fog.dedupe import dedupe_key
from reflexarc.fog.shaping import BATCH_TYPE
from reflexarc.kafka import make_consumer

log = logging.getLogger(__name__)


def record_keys(headers: Any, value: bytes | None) -> list[str]:
    """Dedupe keys of the events one data record carries (a batch record carries several)."""
    source = eid = ctype = None
    for name, val in headers or ():
        if name == "ce_source":
            source = val
        elif name == "ce_id":
            eid = val
        elif name == "ce_type":
            ctype = val
    if source is None or eid is None:
        return []
    src = source.decode(errors="replace")
    if ctype is not None and ctype.decode(errors="replace") == BATCH_TYPE and value:
        try:
            events = json.loads(value).get("events", [])
            return [dedupe_key(src, e["id"]) for e in events if isinstance(e, dict) and isinstance(e.get("id"), str)]
        except (ValueError, AttributeError):
            return []
    return [dedupe_key(src, eid.decode(errors="replace"))]


async def recent_keys(
    kafka: KafkaSettings, topic: str, *, max_records: int, max_age_s: float, timeout_s: float
) -> list[tuple[str, float]]:
    """``(dedupe key, age in seconds)`` of the newest events of ``topic``, oldest first, at most ``max_records``."""
    found: list[tuple[float, str]] = []
    consumer = make_consumer(kafka, group_id=None, auto_offset_reset="earliest")
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            await _read_tail(consumer, topic, max_records, max_age_s, found)
    except TimeoutError:
        log.warning(
            "read %d records of the tail of %s in %.0f s, not all of it: the dedupe window starts with those",
            len(found),
            topic,
            timeout_s,
        )
    finally:
        await consumer.stop()
    found.sort()  # newest first
    keys = [(key, age) for age, key in found[:max_records]]
    keys.reverse()  # oldest first: the window evicts in insertion order
    log.info("read the tail of %s: %d recent event ids in %.2f s", topic, len(keys), time.monotonic() - t0)
    return keys


async def _read_tail(
    consumer: Any, topic: str, max_records: int, max_age_s: float, found: list[tuple[float, str]]
) -> None:
    await consumer.topics()
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        return
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    now_ms = time.time() * 1000.0
    since = await consumer.offsets_for_times({tp: int(now_ms - max_age_s * 1000.0) for tp in tps})
    todo: set[TopicPartition] = set()
    for tp in tps:
        at = since.get(tp)
        if at is None or at.timestamp < 0:
            continue  # nothing newer than the window (Tansu answers timestamp -1 instead of none)
        consumer.seek(tp, max(begin[tp], at.offset, end[tp] - max_records))
        todo.add(tp)
    empty = 0
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=200, max_records=10_000)
        now_ms = time.time() * 1000.0
        for recs in batch.values():
            for r in recs:
                age = max(0.0, (now_ms - r.timestamp) / 1000.0)
                if age <= max_age_s:
                    for key in record_keys(r.headers, r.value):
                        found.append((age, key))
        empty = 0 if batch else empty + 1
        for tp in list(todo):
            hw = consumer.highwater(tp)
            if (hw is not None and await consumer.position(tp) >= hw) or empty >= 3:
                todo.discard(tp)
