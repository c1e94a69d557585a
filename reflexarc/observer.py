"""Watch a running pipeline from Kafka: counts, the loop's latency, and whether every loop closed.

The observer is an ordinary Kafka consumer (no group, nothing committed) of
the pipeline's topics. It joins the events of one loop by their ids::

    data event --(trigger)--> TaskRequest --> TaskResult --> Command --> CommandAck
        cause.time ...................................................... ack.at  = loop latency

It is what ``reflexarc demo`` shows and what decides the demo's exit code.

Each closed loop is also broken down per hop (:data:`HOPS`), from times the
events already carry: the event's own time (the edge), the Kafka record
timestamps (set by each producer when it sends: the fog, the trigger worker,
the site's outbox), the job states' ``at`` (the site) and the ack's ``at``
(the device). Clocks are those of the tiers' hosts: on one host the hops add
up to the loop latency.
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
from datetime import datetime

from aiokafka.errors import KafkaError

from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter, Envelope, EnvelopeError, EventType
from reflexarc.events import Command, CommandAck, CommandStatus, TaskRequest, TaskResult
from reflexarc.kafka import ensure_topics, make_consumer
from reflexarc.topics import Topics

log = logging.getLogger(__name__)

#: The hops of one loop, in order, with what each one measures.
HOPS: dict[str, str] = {
    "edge->kafka": "event time at the edge -> the fog's data record in Kafka",
    "trigger": "data record -> the trigger worker's task request",
    "request->queued": "task request -> the site's durable 'queued' state",
    "queued->running": "queued -> running (waiting for an engine slot, environment)",
    "running->done": "running -> done (the app itself and the engine)",
    "done->result": "done -> the result record in Kafka (the site's outbox)",
    "result->command": "result record -> the trigger worker's command",
    "command->ack": "command record -> the actuator's ack (fog delivery, MQTT, the actuator)",
}

#: Data event times remembered to join with their tasks (bounded: the newest are kept).
_MAX_EVENT_TIMES = 200_000


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
    hops: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HOPS})
    # Times to join hops: data record time per event id, request/result record time per task,
    # job state times per task, command record time per command.
    _data_ts: dict[str, float] = field(default_factory=dict, repr=False)
    _request_ts: dict[str, float] = field(default_factory=dict, repr=False)
    _result_ts: dict[str, float] = field(default_factory=dict, repr=False)
    _state_at: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    _command_ts: dict[str, float] = field(default_factory=dict, repr=False)
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

    def hop(self, name: str, q: float) -> float | None:
        """Percentile ``q`` of one hop (see :data:`HOPS`) in seconds, over the closed loops."""
        return percentile(self.hops[name], q)

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
            self._hops_of(cmd, ack)

    def _hops_of(self, cmd: Command, ack: CommandAck) -> None:
        """Add one closed loop's hops, when every time stamp on its path was seen."""
        assert cmd.cause is not None and cmd.cause.time is not None
        task = cmd.task_id
        states = self._state_at.get(task or "", {})
        marks = [
            cmd.cause.time.timestamp(),
            self._data_ts.get(cmd.cause.event_ids[-1]) if cmd.cause.event_ids else None,
            self._request_ts.get(task or ""),
            states.get("queued"),
            states.get("running"),
            states.get("done"),
            self._result_ts.get(task or ""),
            self._command_ts.get(cmd.command_id),
            ack.at.timestamp(),
        ]
        known = [m for m in marks if m is not None]
        if len(known) != len(marks):
            return
        for name, a, b in zip(HOPS, known, known[1:], strict=False):
            self.hops[name].append(b - a)

    def take(self, env: Envelope, record_ts: float | None = None) -> None:
        """Account for one event read from the pipeline's topics.

        ``record_ts`` is the Kafka record's timestamp in seconds (the producer's
        send time), used for the per-hop breakdown.
        """
        kind = env.type
        if kind == EventType.DATA:
            self.events += 1
            now = time.monotonic()
            self.first_event_at = self.first_event_at or now
            self.last_event_at = now
            if record_ts is not None:
                if len(self._data_ts) >= _MAX_EVENT_TIMES:
                    self._data_ts.pop(next(iter(self._data_ts)))
                self._data_ts.setdefault(env.id, record_ts)
        elif kind == EventType.TASK_REQUEST:
            req = TaskRequest.from_envelope(env)
            if req.task_id not in self.tasks:
                self.tasks[req.task_id] = req
                if record_ts is not None:
                    self._request_ts[req.task_id] = record_ts
                self.recent.append(f"trigger [bold]{req.trigger}[/] -> task {req.app} {req.task_id[:8]}")
        elif kind == EventType.TASK_RESULT:
            res = TaskResult.from_envelope(env)
            if res.task_id not in self.results:
                self.results[res.task_id] = res
                if record_ts is not None:
                    self._result_ts[res.task_id] = record_ts
                self.recent.append(f"task {res.app} {res.task_id[:8]} {res.status}")
        elif kind == EventType.JOB_STATE:
            if isinstance(env.data, dict):
                task_id, state = str(env.data.get("task_id")), str(env.data.get("state"))
                self.job_states[task_id] = state
                at = env.data.get("at")
                if isinstance(at, str):
                    with contextlib.suppress(ValueError):
                        # The first time a task reached each state (a retry re-queues it).
                        self._state_at.setdefault(task_id, {}).setdefault(state, _parse_time(at))
        elif kind == EventType.COMMAND:
            cmd = Command.from_envelope(env)
            if cmd.command_id not in self.commands:
                self.commands[cmd.command_id] = cmd
                if record_ts is not None:
                    self._command_ts[cmd.command_id] = record_ts
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
                            self.stats.take(
                                Envelope.from_kafka(rec.value, rec.headers, rec.key), rec.timestamp / 1000.0
                            )
                        except EnvelopeError as exc:
                            log.debug("observer skipped a record on %s: %s", tp.topic, exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()


def _parse_time(text: str) -> float:
    """An RFC 3339 time (as the events carry it) as a POSIX timestamp."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fmt_ms(seconds: float | None) -> str:
    """Seconds as a short millisecond string."""
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


__all__ = ["HOPS", "LoopObserver", "LoopStats", "fmt_ms", "percentile"]
