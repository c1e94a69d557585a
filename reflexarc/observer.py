"""Watch a running pipeline from Kafka: counts, the loop's latency, and whether every loop closed.

The observer is an ordinary Kafka consumer (no group, nothing committed) of
the pipeline's topics. It joins the events of one loop by their ids::

    data event --(trigger)--> TaskRequest --> TaskResult --> Command --> CommandAck
        cause.time ...................................................... ack.at  = loop latency

It is what ``reflexarc demo`` shows and what decides the demo's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.errors import KafkaError

from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError, EventType
from reflexarc.events import Command, CommandAck, CommandStatus, TaskRequest, TaskResult
from reflexarc.kafka import ensure_topics, make_consumer
from reflexarc.topics import Topics

log = logging.getLogger(__name__)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class LoopStats:
    """What the observer has seen so far."""

    events: int = 0
    deadletters: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None
    tasks: dict[str, TaskRequest] = field(default_factory=dict)
    results: dict[str, TaskResult] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    acks: dict[str, CommandAck] = field(default_factory=dict)
    statuses: dict[str, CommandStatus] = field(default_factory=dict)
    job_states: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    dead_reasons: deque[str] = field(default_factory=lambda: deque(maxlen=5))

    # ---- derived --------------------------------------------------------------
    def running(self) -> int:
        """Tasks requested that have no result yet."""
        return sum(1 for t in self.tasks if t not in self.results)

    def done(self) -> int:
        """Tasks that finished successfully."""
        return sum(1 for r in self.results.values() if r.status == "done")

    def failed(self) -> int:
        """Tasks that ended in any other state."""
        return sum(1 for r in self.results.values() if r.status != "done")

    def delivered(self) -> int:
        """Commands the actuator executed (acked ok)."""
        return sum(1 for a in self.acks.values() if a.ok)

    def rejected(self) -> int:
        """Commands the device refused or failed."""
        return sum(1 for a in self.acks.values() if not a.ok)

    def open_loops(self) -> list[str]:
        """Task ids whose loop has not closed: no result, or no command acked by the actuator."""
        closed_tasks = {c.task_id for cid, c in self.commands.items() if cid in self.acks and self.acks[cid].ok}
        return [t for t in self.tasks if t not in closed_tasks]

    def all_closed(self) -> bool:
        """True when at least one loop ran and every triggered task's command reached the actuator."""
        return bool(self.tasks) and not self.open_loops()

    def event_rate(self) -> float:
        """Instrument events per second over the observed span."""
        if not self.first_event_at or not self.last_event_at or self.last_event_at <= self.first_event_at:
            return 0.0
        return (self.events - 1) / (self.last_event_at - self.first_event_at)

    def latency(self, q: float) -> float | None:
        """Loop latency percentile in seconds (triggering event time -> actuator ack)."""
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, object]:
        """Plain numbers, for printing and for tests."""
        p50, p99 = self.latency(50), self.latency(99)
        return {
            "events": self.events,
            "dead_lettered": self.deadletters,
            "triggers_fired": len(self.tasks),
            "tasks_done": self.done(),
            "tasks_failed": self.failed(),
            "commands": len(self.commands),
            "commands_delivered": self.delivered(),
            "commands_rejected": self.rejected(),
            "open_loops": len(self.open_loops()),
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "events_per_s": round(self.event_rate(), 1),
        }

    # ---- ingest ---------------------------------------------------------------
    def _latency_of(self, command_id: str) -> None:
        cmd, ack = self.commands.get(command_id), self.acks.get(command_id)
        if cmd and ack and ack.ok and cmd.cause and cmd.cause.time:
            self.latencies.append((ack.at - cmd.cause.time).total_seconds())

    def take(self, env: Envelope) -> None:
        """Account for one event read from the pipeline's topics."""
        kind = env.type
        if kind == EventType.DATA:
            self.events += 1
            now = time.monotonic()
            self.first_event_at = self.first_event_at or now
            self.last_event_at = now
        elif kind == EventType.TASK_REQUEST:
            req = TaskRequest.from_envelope(env)
            if req.task_id not in self.tasks:
                self.tasks[req.task_id] = req
                self.recent.append(f"trigger [bold]{req.trigger}[/] -> task {req.app} {req.task_id[:8]}")
        elif kind == EventType.TASK_RESULT:
            res = TaskResult.from_envelope(env)
            if res.task_id not in self.results:
                self.results[res.task_id] = res
                self.recent.append(f"task {res.app} {res.task_id[:8]} {res.status}")
        elif kind == EventType.JOB_STATE:
            if isinstance(env.data, dict):
                self.job_states[str(env.data.get("task_id"))] = str(env.data.get("state"))
        elif kind == EventType.COMMAND:
            cmd = Command.from_envelope(env)
            if cmd.command_id not in self.commands:
                self.commands[cmd.command_id] = cmd
                self._latency_of(cmd.command_id)
        elif kind == EventType.COMMAND_ACK:
            ack = CommandAck.from_envelope(env)
            if ack.command_id not in self.acks:
                self.acks[ack.command_id] = ack
                verdict = "ok" if ack.ok else f"refused: {ack.reason}"
                self.recent.append(f"{ack.device}.{ack.actuator} {verdict}")
                self._latency_of(ack.command_id)
        elif kind == EventType.COMMAND_STATUS:
            st = CommandStatus.from_envelope(env)
            self.statuses[st.command_id] = st

    def take_deadletter(self, dl: DeadLetter) -> None:
        """Account for one dead-lettered message."""
        self.deadletters += 1
        self.dead_reasons.append(f"{dl.origin}: {dl.error}")


class LoopObserver:
    """Consumes a pipeline's topics into :class:`LoopStats`."""

    def __init__(self, kafka: KafkaSettings, topics: Topics, hpc_sites: Iterable[str] = ()) -> None:
        self.kafka = kafka
        self.topics = topics
        self.names = [*topics.kafka_core(), *(topics.kafka_tasks(s) for s in hpc_sites)]
        self.stats = LoopStats()
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Read until ``stop`` is set; bad records are counted as dead letters, never fatal."""
        await ensure_topics(self.kafka, self.names)
        consumer = make_consumer(self.kafka, *self.names, group_id=None, metadata_max_age_ms=2000)
        await consumer.start()
        self.ready.set()
        try:
            while not stop.is_set():
                try:
                    batch = await consumer.getmany(timeout_ms=200, max_records=2000)
                except KafkaError as exc:  # broker restarting: keep watching
                    log.debug("observer: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for tp, records in batch.items():
                    for rec in records:
                        if tp.topic == self.topics.kafka_deadletter:
                            self.stats.take_deadletter(DeadLetter.from_kafka(rec.value, rec.headers))
                            continue
                        try:
                            self.stats.take(Envelope.from_kafka(rec.value, rec.headers, rec.key))
                        except EnvelopeError as exc:
                            log.debug("observer skipped a record on %s: %s", tp.topic, exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


def fmt_ms(seconds: float | None) -> str:
    """Seconds as a short millisecond string."""
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


__all__ = ["LoopObserver", "LoopStats", "fmt_ms", "percentile"]
