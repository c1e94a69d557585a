"""Where a reading client starts in its topics: the beginning, now, or a point in time.

A client that only wants what happens next must not read whole topics from
the start, and one that looks back an hour must not read a week. Positions
are pinned before :func:`start_reader` returns, so an event written after it
returned is never missed (a lazily resolved "latest" could skip it).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.kafka import make_consumer

Start = Literal["beginning", "now"] | datetime
"""A start position: the oldest record, the next record, or the first record at or after a time."""

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_start(text: str, now: datetime | None = None) -> Start:
    """Read ``beginning``/``earliest``, ``now``/``latest``, an ISO 8601 time, or a duration ago (``15m``, ``2h``, ``1d``).

    Raises ``ValueError`` with the accepted forms. A time without a zone is UTC.
    """
    value = text.strip().lower()
    if value in ("beginning", "earliest", "start"):
        return "beginning"
    if value in ("now", "latest", "end"):
        return "now"
    m = _AGO.match(value)
    if m:
        ago = timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"cannot read start position {text!r}: use 'beginning', 'now', an ISO 8601 time "
            "(2026-05-01T12:00:00Z) or a duration ago (30s, 15m, 2h, 1d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def _partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition] | None:
    existing = await consumer.topics()  # one metadata request for the whole cluster
    if any(t not in existing for t in topics):
        return None
    return [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]


async def start_reader(settings: KafkaSettings, topics: list[str], start: Start, **overrides: Any) -> AIOKafkaConsumer:
    """A started consumer (no group, no commits) on ``topics``, positioned at ``start``.

    Fails fast (``KafkaConnectionError``) when the cluster is unreachable and leaves
    nothing unclosed. When a topic does not exist yet, the consumer subscribes and reads
    every topic from its first record once it appears, whatever ``start`` says (clients
    that read several topics create them first, as :class:`SiteClient` does).
    """
    # "earliest" only applies where no explicit seek below placed the position: topics created later.
    consumer = make_consumer(settings, group_id=None, auto_offset_reset="earliest", **overrides)
    try:
        await consumer.start()
        parts = await _partitions(consumer, topics)
        if parts is None:
            # Not every topic exists yet: subscribe, so they are read once created. Reading a new
            # topic from its first record is right for every start: it holds nothing older.
            consumer.subscribe(topics)
            return consumer
        consumer.assign(parts)
        if start == "beginning":
            await consumer.seek_to_beginning(*parts)
        elif start == "now":
            await consumer.seek_to_end(*parts)
        else:
            found = await consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in parts})
            late = [tp for tp, hit in found.items() if hit is None]  # nothing that recent: the next record
            for tp, hit in found.items():
                if hit is not None:
                    consumer.seek(tp, hit.offset)
            if late:
                await consumer.seek_to_end(*late)
        for tp in parts:
            await consumer.position(tp)  # pin every position now, not at the first fetch
        return consumer
    except BaseException:
        await consumer.stop()  # no "Unclosed AIOKafkaConsumer" after the error line
        raise
