"""The site agent: takes task requests for its site from Kafka, runs them, reports back.

Flow of one task (every arrow is durable before the next step)::

    rx.tasks.<site> ─▶ job row (DB) ─▶ commit offset                       (service.intake)
                        │
                        ▼  claimed while the engine has room               (service.scheduler)
                     one attempt: engine (local / dask / batch)            (service.runner)
                        │
                        ▼
                     outcome file on disk ─▶ job row + result & state events (DB outbox)
                                                  │
                                                  ▼  Kafka acks=all ─▶ outbox row published (service.outbox)

* A task id already in the database is not created again (redelivery is harmless).
* Every state change is a :class:`~reflexarc.events.JobState` event with its reason.
* What the loops record at the same moment is one transaction (service.jobs).
* After a crash the agent re-attaches to executions an engine can find again
  (batch jobs), takes results that finished meanwhile from disk, and queues
  the rest again; events whose publication was interrupted are looked up on
  their topics first, so each result and each state event is published once.
* With ``compose:`` a task needing more than the site's ``resources`` runs on
  a machine composed for it (service.machines); its events name the machine.

This module only wires the services of :mod:`reflexarc.hpc_bridge.service`
together and runs their loops until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from reflexarc.config import KafkaSettings
from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.engines import Engine, make_engine
from reflexarc.hpc_bridge.registry import resolve_apps
from reflexarc.hpc_bridge.service.intake import Intake
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.machines import ComposedMachines
from reflexarc.hpc_bridge.service.outbox import OutboxPublisher
from reflexarc.hpc_bridge.service.presence import Presence
from reflexarc.hpc_bridge.service.runner import Runner
from reflexarc.hpc_bridge.service.scheduler import Scheduler
from reflexarc.hpc_bridge.service.watch import CancelWatch
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.kafka import ensure_topics, make_consumer, make_producer
from reflexarc.process import notify_ready
from reflexarc.topics import Topics

log = logging.getLogger(__name__)


class SiteAgent:
    """One site's agent process (``reflexarc site run site.yaml``)."""

    def __init__(self, cfg: SiteConfig, engine: Engine | None = None, shutdown_grace_s: float = 10.0) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.namespace)
        self.kafka: KafkaSettings = cfg.kafka
        self.apps: dict[str, AppSpec] = resolve_apps(cfg)
        self.work_root = cfg.state_path / "work"
        self.engine = engine or make_engine(cfg.engine, str(self.work_root), site=cfg.site)
        self.shutdown_grace_s = shutdown_grace_s
        self._runner: Runner | None = None

    @property
    def tasks_topic(self) -> str:
        """The Kafka topic this site takes requests from."""
        return self.topics.kafka_tasks(self.cfg.site)

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel a running task of this agent (returns False if it is not running here)."""
        return self._runner is not None and await self._runner.cancel(task_id, reason)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (SIGTERM in the CLI); then stop cleanly."""
        stop = stop or asyncio.Event()
        cfg = self.cfg
        cfg.state_path.mkdir(parents=True, exist_ok=True)
        self.work_root.mkdir(parents=True, exist_ok=True)
        # First, so that a missing compose token fails at once with its reason.
        machines = await ComposedMachines.open(cfg)
        jobs: AsyncJobStore | None = None
        producer: Any = None
        try:
            await ensure_topics(
                self.kafka,
                [self.tasks_topic, self.topics.kafka_results, self.topics.kafka_jobs, self.topics.kafka_deadletter],
            )
            jobs = await AsyncJobStore.open(cfg.database_url, cfg.site, self.topics)
            # No linger: every send (an outbox page, a fetch's dead letters) sends all its records and
            # then awaits them, so they travel as one batch anyway; a linger only delayed each page.
            producer = make_producer(self.kafka, linger_ms=0)
            await producer.start()
            await self._serve(stop, jobs, producer, machines)
        finally:
            if machines is not None:
                await machines.close()
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()
            if jobs is not None:
                await jobs.close()

    async def _serve(
        self, stop: asyncio.Event, jobs: AsyncJobStore, producer: Any, machines: ComposedMachines | None
    ) -> None:
        """Start the engine and the loops; on stop (or a loop's failure) stop them in order."""
        cfg = self.cfg
        runner = self._runner = Runner(cfg, self.apps, self.engine, jobs, machines)
        scheduler = Scheduler(cfg.site, self.engine, jobs, runner)
        runner.on_queued = scheduler.wake
        outbox = OutboxPublisher(jobs, producer, self.kafka, cfg.site)
        jobs.on_written = outbox.offer
        consumer = make_consumer(self.kafka, self.tasks_topic, group_id=f"rx-site-{cfg.site}", session_timeout_ms=6000)
        intake = Intake(
            cfg.site, self.apps, jobs, consumer, producer, self.topics.kafka_deadletter, cfg.max_backlog, scheduler.wake
        )
        presence = Presence(cfg, self.apps, self.engine, jobs, producer) if cfg.presence.enabled else None
        loops: list[asyncio.Task[None]] = []
        consuming: asyncio.Task[None] | None = None
        scheduling: asyncio.Task[None] | None = None
        publishing: asyncio.Task[None] | None = None
        stopper = asyncio.create_task(stop.wait())
        try:
            await self.engine.start()
            await outbox.settle()
            await scheduler.recover()
            # Work already in the database goes on while the consumer joins its group
            # (a join can take seconds, e.g. while a crashed predecessor's session expires).
            scheduling = asyncio.create_task(scheduler.run(), name="scheduler")
            publishing = asyncio.create_task(outbox.run(), name="outbox")
            loops = [scheduling, publishing, asyncio.create_task(CancelWatch(jobs, runner).run(), name="watch")]
            if machines is not None:
                loops.append(asyncio.create_task(machines.run(), name="machines"))
            if presence is not None:
                loops.append(asyncio.create_task(presence.run(), name="presence"))
            starting = asyncio.create_task(consumer.start())
            await asyncio.wait([stopper, starting, *loops], return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                log.info(
                    "site %s: taking tasks from %s with the %s engine (%d slots); apps: %s",
                    cfg.site,
                    self.tasks_topic,
                    self.engine.name,
                    self.engine.capacity,
                    ", ".join(sorted(self.apps)) or "none",
                )
                notify_ready("site consuming")
                consuming = asyncio.create_task(intake.run(), name="intake")
                await asyncio.wait([stopper, consuming, *loops], return_when=asyncio.FIRST_COMPLETED)
            else:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            for t in [*loops, *([consuming] if consuming else [])]:
                error = t.exception() if t.done() and not t.cancelled() else None
                if error is not None:
                    raise error  # a loop failed: the agent stops with its error
        finally:
            stopper.cancel()
            log.info("site %s: stopping", cfg.site)
            # Stop taking requests first; what was taken is in the database already.
            if consuming is not None:
                consuming.cancel()
                await asyncio.gather(consuming, return_exceptions=True)
            with contextlib.suppress(Exception):
                await consumer.stop()
            # No new attempt starts while running ones are given their grace period.
            if scheduling is not None:
                scheduling.cancel()
                await asyncio.gather(scheduling, return_exceptions=True)
            await scheduler.drain(self.shutdown_grace_s)
            # The publisher finishes the page in flight (cancelled, it would send it twice).
            outbox.stop()
            if publishing is not None:
                await asyncio.wait({publishing}, timeout=self.shutdown_grace_s)
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            with contextlib.suppress(Exception):
                await outbox.flush()
            if presence is not None:
                await presence.last_word()
            await self.engine.close()
