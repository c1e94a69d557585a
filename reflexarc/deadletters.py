"""The dead-letter topic read back: what is there, and sending chosen letters back to where they came from.

A dead letter of a consumed Kafka record (:meth:`DeadLetter.of_record`)
carries the record's topic, key, value and headers, so once its cause is
fixed it can be replayed as it was: the same CloudEvent id, which every
consumer deduplicates on, so replaying twice still processes it once.
Dead letters of MQTT input (the fog's ingest) name an MQTT topic and have
no Kafka record to restore; they are listed but not replayed.

A letter is named by its place in the dead-letter topic, ``PARTITION:OFFSET``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from aiokafka import TopicPartition

from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter
from reflexarc.kafka import make_consumer, make_producer


class DeadLettersError(RuntimeError):
    """The dead-letter topic could not be read, or a letter cannot be replayed."""


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def id(self) -> str:
        """``PARTITION:OFFSET`` in the dead-letter topic."""
        return f"{self.partition}:{self.offset}"

    @property
    def replayable(self) -> bool:
        """True for a consumed Kafka record's letter (it names the topic to send it back to)."""
        return self.letter.topic is not None


def select(letters: Iterable[StoredLetter], ids: Sequence[str] = (), stage: str | None = None) -> list[StoredLetter]:
    """The letters named in ``ids`` and those whose stage matches the glob ``stage``.

    Raises :class:`DeadLettersError` for an id that is not in the topic.
    """
    letters = list(letters)
    by_id = {s.id: s for s in letters}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DeadLettersError(f"no dead letter {', '.join(missing)} (ids are PARTITION:OFFSET, as `list` shows)")
    chosen = {i: by_id[i] for i in ids}
    if stage is not None:
        chosen.update((s.id, s) for s in letters if fnmatchcase(s.letter.stage, stage))
    return sorted(chosen.values(), key=lambda s: (s.partition, s.offset))


async def read_letters(settings: KafkaSettings, topic: str, timeout: float = 30.0) -> list[StoredLetter]:
    """Every record of the dead-letter ``topic``, oldest first per partition.

    Reads each partition until its fetch position reaches the high watermark
    the fetch responses report: some brokers (Tansu) answer ``end_offsets``
    with the first offset of the last batch, which would miss its other records.
    """
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return []  # no dead letter was ever written
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        # Exact for an empty partition on every broker; only a lower bound otherwise (see above).
        ends = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if ends[tp] > begins[tp]}
        for tp in todo:
            consumer.seek(tp, begins[tp])
        found: list[StoredLetter] = []
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise DeadLettersError(
                    f"{topic}: partitions {sorted(tp.partition for tp in todo)} not read "
                    f"to their end within {timeout:.0f} s"
                )
            batch = await consumer.getmany(*todo, timeout_ms=200, max_records=10_000)
            for records in batch.values():
                found.extend(_stored(r) for r in records)
            for tp in list(todo):
                hw = consumer.highwater(tp)
                if hw is not None and await consumer.position(tp) >= hw:
                    todo.discard(tp)
        return sorted(found, key=lambda s: (s.partition, s.offset))
    finally:
        await consumer.stop()


def _stored(record: Any) -> StoredLetter:
    return StoredLetter(record.partition, record.offset, DeadLetter.from_kafka(record.value, record.headers))


async def replay(settings: KafkaSettings, letters: Sequence[StoredLetter]) -> list[tuple[StoredLetter, str]]:
    """Send each letter's record back to its origin topic (same key, value and headers; so the same event id).

    One at a time, each acknowledged by the cluster (acks=all) before the
    next, so the origin topic receives them in the order given. Returns each
    letter with where it landed (``topic/partition/offset``).
    """
    refused = [s.id for s in letters if not s.replayable]
    if refused:
        raise DeadLettersError(
            f"not replayable: {', '.join(refused)} (dead letters of MQTT input, or written before dead letters "
            "kept their Kafka record, name no topic to send them back to)"
        )
    producer = make_producer(settings)
    await producer.start()
    try:
        sent: list[tuple[StoredLetter, str]] = []
        for s in letters:
            dl = s.letter
            assert dl.topic is not None  # checked above
            meta = await (await producer.send(dl.topic, value=dl.payload, key=dl.key, headers=list(dl.extra_headers)))
            sent.append((s, f"{meta.topic}/{meta.partition}/{meta.offset}"))
        return sent
    finally:
        await producer.stop()
