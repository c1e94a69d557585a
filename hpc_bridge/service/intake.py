"""Intake: task requests from the site's Kafka topic into the job store, offsets committed after.

Each fetch (up to ``max_records`` records) becomes one batch: records that
are not a valid :class:`~reflexarc.events.TaskRequest` for this site go to
the dead-letter topic (acknowledged by Kafka first), the others are recorded
as jobs in one transaction (the scheduler is woken as it is queued, so that
its claim of them rides in the same one), and only then is the consumer's
offset committed. A crash anywhere in between redelivers the records, and the job
store skips the task ids it already has: a task is never created twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from reflexarc.envelope import DeadLetter, EnvelopeError
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.metrics import DEAD_LETTERS, TASKS_RECEIVED
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.store import NewJob
from reflexarc.kafka import event_of

log = logging.getLogger(__name__)

#: How often the backlog is counted to decide whether intake pauses (seconds).
BACKLOG_CHECK_S = 0.5


def new_job(req: TaskRequest, apps: dict[str, AppSpec], site: str) -> NewJob:
    """What the site decides about a request: its retries, policy and timeout, or why it is refused."""
    app = apps.get(req.app)
    if app is None:
        known = ", ".join(sorted(apps)) or "none"
        msg = f"unknown app {req.app!r} at site {site!r}; known apps: {known}"
        log.warning("task %s: %s", req.task_id, msg)
        return NewJob(req, reject=msg)
    retries = req.retries if req.retries > 0 else app.effective_retries
    timeout = req.timeout_s or app.timeout_s or req.resources.walltime_s or app.walltime_s
    return NewJob(req, max_retries=retries, on_failure=app.on_failure, timeout_s=timeout)


class Intake:
    """Consumes ``rx.tasks.<site>`` into the job store (one service loop: :meth:`run`)."""

    def __init__(
        self,
        site: str,
        apps: dict[str, AppSpec],
        jobs: AsyncJobStore,
        consumer: Any,
        producer: Any,
        deadletter_topic: str,
        max_backlog: int,
        on_recorded: Callable[[], None],
        max_records: int = 1000,
    ) -> None:
        self.site = site
        self.apps = apps
        self.jobs = jobs
        self.consumer = consumer
        self.producer = producer
        self.deadletter_topic = deadletter_topic
        self.max_backlog = max_backlog
        self.on_recorded = on_recorded
        self.max_records = max_records
        self._received = TASKS_RECEIVED.labels(site)
        self._paused = False
        self._backlog_checked = 0.0

    async def _pace(self) -> None:
        """Pause the consumer above ``max_backlog`` waiting jobs; resume below half of it."""
        now = time.monotonic()
        if now - self._backlog_checked < BACKLOG_CHECK_S:
            return
        self._backlog_checked = now
        backlog = await self.jobs.backlog()
        if backlog >= self.max_backlog and not self._paused:
            log.warning("backlog of %d jobs reached max_backlog; pausing intake", backlog)
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
        elif self._paused and backlog < self.max_backlog // 2:
            self.consumer.resume(*self.consumer.assignment())
            self._paused = False

    def read(self, records: list[Any]) -> tuple[list[NewJob], list[DeadLetter]]:
        """Requests for this site, and dead letters (with the reason) for everything else."""
        jobs: list[NewJob] = []
        dead: list[DeadLetter] = []
        for rec in records:
            try:
                req = TaskRequest.from_envelope(event_of(rec))
                if req.site != self.site:
                    raise EnvelopeError(f"request for site {req.site!r} arrived on site {self.site!r}'s topic")
            except (EnvelopeError, ValueError) as exc:
                dl = DeadLetter.of_record(rec, "site-intake", str(exc))
                log.warning("dead letter %s: %s", dl.origin, exc)
                dead.append(dl)
                continue
            jobs.append(new_job(req, self.apps, self.site))
        return jobs, dead

    async def run(self) -> None:
        """Consume until cancelled."""
        from aiokafka.errors import CommitFailedError, KafkaError

        while True:
            await self._pace()
            batches = await self.consumer.getmany(timeout_ms=500, max_records=self.max_records)
            records = [r for recs in batches.values() for r in recs]
            if not records:
                continue
            jobs, dead = self.read(records)
            if dead:
                acks = []
                for d in dead:
                    key, value, headers = d.to_kafka()
                    acks.append(await self.producer.send(self.deadletter_topic, value=value, key=key, headers=headers))
                await asyncio.gather(*acks)
                DEAD_LETTERS.labels(self.site).inc(len(dead))
            if jobs:
                recording = self.jobs.create_soon(jobs)
                # Told while the jobs are still being recorded: the scheduler's claim joins the same
                # transaction (one commit, not two, between a request and its start).
                self.on_recorded()
                created = await recording
                self._received.inc(len(created))
            try:
                await self.consumer.commit()
            except (CommitFailedError, KafkaError) as exc:
                # Redelivered later; the job store drops the duplicates.
                log.warning("offset commit failed (%s); records will be seen again", exc)
