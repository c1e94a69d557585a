"""The site agent: takes task requests for its site from Kafka, runs them, reports back.

Flow of one task (every arrow is durable before the next step)::

    rx.tasks.<site> ─▶ job row (DB) ─▶ commit offset
                        │
                        ▼  scheduler: queued -> engine (local / dask / batch)
                     outcome file on disk ─▶ job row + result & state events (DB outbox)
                                                  │
                                                  ▼  publisher: Kafka acks=all ─▶ outbox row published

* A task id already in the database is not created again (redelivery is harmless).
* Every state change is a :class:`~reflexarc.events.JobState` event with its reason.
* After a crash the agent re-attaches to executions an engine can find again
  (batch jobs), takes results that finished meanwhile from disk, and queues
  the rest again; results whose publication was interrupted are looked up on
  the results topic first, so each task's result is published exactly once.
* With ``compose:`` a task needing more than the site's ``resources`` runs on
  a machine composed for it (see :mod:`reflexarc.hpc_bridge.machines`); its
  events name the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from reflexarc.config import KafkaSettings
from reflexarc.envelope import DeadLetter, EnvelopeError
from reflexarc.events import TaskRequest, stable_id
from reflexarc.hpc_bridge.apps import (
    AppError,
    AppSpec,
    choose_implementation,
    mpi_argv,
    render_argv,
)
from reflexarc.hpc_bridge.compose.drivers import DriverError
from reflexarc.hpc_bridge.compose.model import Machine
from reflexarc.hpc_bridge.compose.placement import PlacementError
from reflexarc.hpc_bridge.engines import Engine, EngineError, Execution, make_engine, outcome_from_worker
from reflexarc.hpc_bridge.machines import (
    MachinePool,
    MachinesError,
    exceeds,
    machine_environment,
    offer_of,
    task_needs,
)
from reflexarc.hpc_bridge.registry import resolve_apps
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import JobStore, JobView, NewJob, Outcome
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome
from reflexarc.kafka import ensure_topics, event_of, make_consumer, make_producer, send_event
from reflexarc.process import notify_ready
from reflexarc.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

TASKS_RECEIVED = Counter("rx_site_tasks_received_total", "Task requests recorded", ["site"])
TASKS_FINISHED = Counter("rx_site_tasks_finished_total", "Tasks that ended, by state", ["site", "status"])
TASKS_RUNNING = Gauge("rx_site_tasks_running", "Tasks handed to the engine", ["site"])
DEAD_LETTERS = Counter("rx_site_deadletters_total", "Requests that could not be read", ["site"])

_SAFE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


async def nap(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 a cancel that
    races ``wait_for``'s own timeout can be swallowed, and a loop would never end.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def job_dirname(task_id: str) -> str:
    """A file-system-safe folder name for a task id."""
    return task_id if _SAFE_RE.match(task_id) and task_id not in (".", "..") else stable_id(task_id)


class Batcher:
    """Coalesces calls made at the same moment into one call of ``run_many`` (one DB transaction).

    Dozens of tasks finishing together then cost one commit (one fsync), not dozens.
    """

    def __init__(self, run_many: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._run_many = run_many
        self._items: list[tuple[Any, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, item: Any) -> Any:
        """Queue ``item``; return its result once its batch ran."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._items.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._items:
            await asyncio.sleep(0)  # let the other callers of this moment join the batch
            batch, self._items = self._items, []
            try:
                results = await self._run_many([item for item, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)


class CompositionFailed(RuntimeError):
    """No machine could be composed for a task (nothing fits): the job fails with the composer's reason."""


class SiteAgent:
    """One site's agent process (``reflexarc site run site.yaml``)."""

    def __init__(self, cfg: SiteConfig, engine: Engine | None = None, shutdown_grace_s: float = 10.0) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.namespace)
        self.kafka: KafkaSettings = cfg.kafka
        self.apps: dict[str, AppSpec] = resolve_apps(cfg)
        self.work_root = cfg.state_path / "work"
        self.engine = engine or make_engine(cfg.engine, str(self.work_root))
        self.shutdown_grace_s = shutdown_grace_s
        self.store: JobStore | None = None
        self._db_pool = ThreadPoolExecutor(1, thread_name_prefix="rx-site-db")
        self._wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._executions: dict[str, Execution] = {}
        self._cancelling: dict[str, str] = {}
        self._envs: Any = None
        self._stopping = False
        self.composer: Any = None
        self.machines: MachinePool | None = None
        self._submitted = Batcher(lambda items: self._db(self.store.submitted_many, items))  # type: ignore[union-attr]
        self._finished = Batcher(lambda items: self._db(self.store.finish_many, items))  # type: ignore[union-attr]

    # ---- helpers -------------------------------------------------------------------------
    async def _db(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._db_pool, partial(fn, *args))

    @property
    def tasks_topic(self) -> str:
        """The Kafka topic this site takes requests from."""
        return self.topics.kafka_tasks(self.cfg.site)

    def _new_job(self, req: TaskRequest) -> NewJob:
        app = self.apps.get(req.app)
        if app is None:
            known = ", ".join(sorted(self.apps)) or "none"
            msg = f"unknown app {req.app!r} at site {self.cfg.site!r}; known apps: {known}"
            log.warning("task %s: %s", req.task_id, msg)
            return NewJob(req, reject=msg)
        retries = req.retries if req.retries > 0 else app.effective_retries
        timeout = req.timeout_s or app.timeout_s or req.resources.walltime_s or app.walltime_s
        return NewJob(req, max_retries=retries, on_failure=app.on_failure, timeout_s=timeout)

    # ---- life cycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (SIGTERM in the CLI); then stop cleanly."""
        stop = stop or asyncio.Event()
        self.cfg.state_path.mkdir(parents=True, exist_ok=True)
        self.work_root.mkdir(parents=True, exist_ok=True)
        # First, so that a missing compose token fails at once with its reason.
        await self._start_machines()
        try:
            await ensure_topics(
                self.kafka,
                [self.tasks_topic, self.topics.kafka_results, self.topics.kafka_jobs, self.topics.kafka_deadletter],
            )
            self.store = await self._db(JobStore, self.cfg.database_url, self.cfg.site, self.topics)
            producer = make_producer(self.kafka)
            await producer.start()
        except BaseException:
            await self._stop_machines()
            raise
        consumer = None
        loops: list[asyncio.Task[None]] = []
        try:
            await self.engine.start()
            await self._settle_interrupted_results()
            await self._recover()
            # Work already in the database goes on while the consumer joins its group
            # (a join can take seconds, e.g. while a crashed predecessor's session expires).
            loops = [
                asyncio.create_task(self._schedule(), name="schedule"),
                asyncio.create_task(self._publish(producer), name="publish"),
                asyncio.create_task(self._watch(), name="watch"),
            ]
            if self.machines is not None:
                loops.append(asyncio.create_task(self._expire_machines(), name="machines"))
            consumer = make_consumer(
                self.kafka, self.tasks_topic, group_id=f"rx-site-{self.cfg.site}", session_timeout_ms=6000,
            )
            stopper = asyncio.create_task(stop.wait())
            starting = asyncio.create_task(consumer.start())
            await asyncio.wait([stopper, starting, *loops], return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                log.info(
                    "site %s: taking tasks from %s with the %s engine (%d slots); apps: %s",
                    self.cfg.site, self.tasks_topic, self.engine.name, self.engine.capacity,
                    ", ".join(sorted(self.apps)) or "none",
                )
                notify_ready("site consuming")
                loops.insert(0, asyncio.create_task(self._consume(consumer, producer), name="consume"))
                await asyncio.wait([stopper, *loops], return_when=asyncio.FIRST_COMPLETED)
            else:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            stopper.cancel()
            for t in loops:
                if t.done() and not t.cancelled() and t.exception():
                    raise t.exception()  # type: ignore[misc]
        finally:
            self._stopping = True
            log.info("site %s: stopping", self.cfg.site)
            # Stop taking requests first; what was taken is in the database already.
            intake = [t for t in loops if t.get_name() == "consume"]
            for t in intake:
                t.cancel()
            await asyncio.gather(*intake, return_exceptions=True)
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            await self._drain()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._stop_machines()
            with contextlib.suppress(Exception):
                await self._flush_outbox(producer)
            await producer.stop()
            await self.engine.close()
            if self.store is not None:
                await self._db(self.store.close)
            self._db_pool.shutdown(wait=True)

    async def _drain(self) -> None:
        """Give running tasks a grace period; leave re-attachable ones running, queue the rest again."""
        if not self._jobs:
            return
        if not self.engine.reattachable:
            _, pending = await asyncio.wait(list(self._jobs.values()), timeout=self.shutdown_grace_s)
        else:
            pending = set(self._jobs.values())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- composed machines ----------------------------------------------------------------------
    async def _start_machines(self) -> None:
        """Open the composer of ``compose:`` and take over machines a previous run left."""
        c = self.cfg.compose
        if c is None:
            return
        from reflexarc.hpc_bridge.compose.composer import Composer
        from reflexarc.hpc_bridge.compose.drivers import Driver, InventoryDriver, SlurmDriver

        driver: Driver = InventoryDriver()
        if c.driver == "slurm":
            driver = SlurmDriver(env={**os.environ, **c.slurm.env}, partition=c.slurm.partition,
                                 account=c.slurm.account, start_timeout_s=c.slurm.start_timeout_s)

        def open_composer() -> tuple[Any, Any]:
            try:
                composer = Composer(self.cfg.compose_database, self.cfg.compose_pools_path, driver)
            except ValueError as exc:
                raise MachinesError(f"compose.pools: {exc}") from None
            try:
                identity = composer.identity_from_env(c.token_env)
            except PermissionError as exc:
                composer.close()
                raise MachinesError(
                    f"compose: {exc} (the site agent composes machines as the user whose token is in "
                    f"${c.token_env}; its sha256 must be under 'tokens' in {self.cfg.compose_pools_path})"
                ) from None
            return composer, identity

        self.composer, identity = await asyncio.to_thread(open_composer)
        self.machines = MachinePool(
            self.composer, identity, self.cfg.site, idle_timeout_s=c.idle_timeout_s,
            max_machines=c.max_machines, rack=c.rack,
        )
        adopted = await self.machines.adopt()
        if c.driver == "slurm":
            from reflexarc.hpc_bridge.engines.allocation import cancel_task_steps

            # Steps whose srun died with the previous agent would run on beside the re-run.
            for m in adopted:
                if m.realisation.get("job_id"):
                    await asyncio.to_thread(cancel_task_steps, str(m.realisation["job_id"]), c.slurm.env)
        log.info("site %s: composing machines as %s with the %s driver (at most %d, freed after %gs idle)",
                 self.cfg.site, identity.user, c.driver, c.max_machines, c.idle_timeout_s)

    async def _expire_machines(self) -> None:
        assert self.machines is not None and self.cfg.compose is not None
        interval = min(1.0, max(0.1, self.cfg.compose.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            await self.machines.reap()

    async def _stop_machines(self) -> None:
        if self.machines is not None and self.cfg.compose is not None:
            with contextlib.suppress(Exception):
                await self.machines.close(free_idle=self.cfg.compose.free_on_stop)
        if self.composer is not None:
            await asyncio.to_thread(self.composer.close)

    async def _machine_for(self, job: JobView, app: AppSpec) -> Machine | None:
        """A composed machine if the task needs more than the site offers (``None``: run it here)."""
        if self.machines is None:
            return None
        need = task_needs(job.request.resources, app)
        why = exceeds(need, self.cfg.resources)
        if why is None:
            return None
        store = self.store
        assert store is not None

        async def note(text: str) -> None:
            await self._db(store.note, job.task_id, f"{text}; the task {why}")

        try:
            return await self.machines.acquire(job.task_id, need, note)
        except PlacementError as exc:
            raise CompositionFailed(f"the task {why}, and no machine can be composed for it: {exc}") from None
        except DriverError as exc:
            raise EngineError(f"composing a machine for the task failed: {exc}") from None

    async def _submit(self, spec: RunSpec, machine: Machine | None) -> Execution:
        """Hand the attempt to the engine, or run it inside the machine's Slurm allocation."""
        if machine is not None and machine.driver == "slurm":
            from reflexarc.hpc_bridge.engines.allocation import run_in_allocation

            assert self.cfg.compose is not None
            job_id = machine.realisation.get("job_id")
            if not job_id:
                raise EngineError(f"machine {machine.id} has no Slurm job id in its realisation")
            execution = await run_in_allocation(spec, str(job_id), self.cfg.compose.slurm.env, machine.id)
        else:
            execution = await self.engine.submit(spec)
        if machine is not None:
            execution.machine = machine.id
        return execution

    # ---- intake ------------------------------------------------------------------------------
    async def _consume(self, consumer: Any, producer: Any) -> None:
        from aiokafka.errors import CommitFailedError, KafkaError

        paused = False
        while True:
            backlog = await self._db(self.store.backlog)  # type: ignore[union-attr]
            if backlog >= self.cfg.max_backlog and not paused:
                log.warning("backlog of %d jobs reached max_backlog; pausing intake", backlog)
                consumer.pause(*consumer.assignment())
                paused = True
            elif paused and backlog < self.cfg.max_backlog // 2:
                consumer.resume(*consumer.assignment())
                paused = False
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            records = [r for recs in batches.values() for r in recs]
            if not records:
                continue
            jobs: list[NewJob] = []
            dead: list[DeadLetter] = []
            for rec in records:
                origin = f"{rec.topic}/{rec.partition}/{rec.offset}"
                try:
                    req = TaskRequest.from_envelope(event_of(rec))
                    if req.site != self.cfg.site:
                        raise EnvelopeError(
                            f"request for site {req.site!r} arrived on site {self.cfg.site!r}'s topic"
                        )
                except (EnvelopeError, ValueError) as exc:
                    log.warning("dead letter %s: %s", origin, exc)
                    dead.append(DeadLetter(error=str(exc), stage="site-intake", origin=origin,
                                           payload=rec.value or b""))
                    continue
                jobs.append(self._new_job(req))
            if dead:
                futs = []
                for d in dead:
                    key, value, headers = d.to_kafka()
                    futs.append(await producer.send(self.topics.kafka_deadletter, value=value, key=key,
                                                    headers=headers))
                await asyncio.gather(*futs)
                DEAD_LETTERS.labels(self.cfg.site).inc(len(dead))
            created = await self._db(self.store.create_jobs, jobs)  # type: ignore[union-attr]
            TASKS_RECEIVED.labels(self.cfg.site).inc(len(created))
            try:
                await consumer.commit()
            except (CommitFailedError, KafkaError) as exc:
                # Redelivered later; the database drops the duplicates.
                log.warning("offset commit failed (%s); records will be seen again", exc)
            self._wake.set()
            self._outbox_wake.set()

    # ---- scheduling ----------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            await nap(self._wake, 1.0)
            self._wake.clear()
            free = self.engine.capacity + self.engine.prefetch - len(self._jobs)
            if free <= 0:
                continue
            for job in await self._db(self.store.claim, free, self.engine.name):  # type: ignore[union-attr]
                self._start_job(job, recovering=False)

    def _start_job(self, job: JobView, recovering: bool) -> None:
        task = asyncio.create_task(self._run_job(job, recovering), name=f"job-{job.task_id}")
        self._jobs[job.task_id] = task
        TASKS_RUNNING.labels(self.cfg.site).set(len(self._jobs))

        def done(_t: asyncio.Task[None], task_id: str = job.task_id) -> None:
            self._jobs.pop(task_id, None)
            self._executions.pop(task_id, None)
            TASKS_RUNNING.labels(self.cfg.site).set(len(self._jobs))
            self._wake.set()
            self._outbox_wake.set()

        task.add_done_callback(done)

    async def _recover(self) -> None:
        """Pick up what a previous agent process left in flight."""
        jobs = await self._db(self.store.in_flight)  # type: ignore[union-attr]
        if jobs:
            log.info("recovering %d job(s) that were in flight when the agent last stopped", len(jobs))
        for job in jobs:
            self._start_job(job, recovering=True)

    def workdir(self, job: JobView) -> Path:
        """Work directory of the current attempt of ``job`` (its outcome file is in it)."""
        return self.work_root / job_dirname(job.task_id) / str(max(job.attempt, 1))

    def run_spec(self, job: JobView, app: AppSpec, python: str | None, machine: Machine | None = None) -> RunSpec:
        """What the worker runs for this attempt of ``job`` (on ``machine`` if one was composed for it)."""
        req = job.request
        # On a composed machine the implementation is chosen for that machine's devices.
        offer = offer_of(machine) if machine is not None else self.cfg.resources
        impl = choose_implementation(job.app, app, offer) if app.kind == "python" else None
        workdir = self.workdir(job)
        argv = None
        if app.argv is not None:
            argv = render_argv(app.argv, req.args)
            if app.mpi is not None:
                argv = mpi_argv(app.mpi, argv)
        cpus = max(req.resources.cpus, (impl.cpus if impl and impl.cpus else app.cpus))
        memory = req.resources.memory_gb or (impl.memory_gb if impl else None) or app.memory_gb
        environment = dict(app.environment)
        if machine is not None:
            cpus = min(cpus, machine.spec.cpus)
            # Slurm sets CUDA_VISIBLE_DEVICES inside its allocation; logical compositions say it here.
            environment.update(machine_environment(machine, set_cuda=machine.driver != "slurm"))
        return RunSpec(
            task_id=job.task_id, attempt=max(job.attempt, 1), kind=app.kind, workdir=str(workdir),
            result_path=str(workdir / "outcome.json"), function=impl.function if impl else None,
            argv=argv, args=req.args, python=python,
            environment=environment, cpus=cpus, gpus=impl.gpus if impl else app.gpus,
            memory_gb=memory, walltime_s=req.resources.walltime_s or app.walltime_s or job.timeout_s,
            timeout_s=job.timeout_s,
            # A Dask worker is a shared process: run in a child so the machine's variables apply.
            isolate=machine is not None and self.engine.name == "dask" and app.kind == "python",
        )

    async def _prepare_env(self, job: JobView, app: AppSpec, spec: RunSpec) -> None:
        """Point ``spec`` at the app's packed environment (built once, cached by hash)."""
        if app.env is None or not app.env.pack:
            return
        from reflexarc.hpc_bridge.envpack import EnvError, EnvManager
        from reflexarc.hpc_bridge.worker import ensure_unpacked

        if self._envs is None:
            self._envs = EnvManager(self.cfg.env_cache_path)
        await self._db(self.store.note, job.task_id, "preparing its packed environment")  # type: ignore[union-attr]
        try:
            packed = await asyncio.to_thread(self._envs.pack, job.app, app)
        except EnvError as exc:
            raise AppError(f"packed environment of app {job.app!r}: {exc}") from exc
        spec.env_tarball, spec.env_hash = str(packed.tarball), packed.hash[:24]
        if self.engine.name == "local":
            # This node runs it: unpack here, start workers with that interpreter.
            spec.python = await asyncio.to_thread(ensure_unpacked, spec.env_tarball, spec.env_hash, None)

    async def _run_job(self, job: JobView, recovering: bool) -> None:
        store = self.store
        assert store is not None
        machine: Machine | None = None
        try:
            app = self.apps.get(job.app)
            if app is None:
                known = ", ".join(sorted(self.apps)) or "none"
                raise AppError(f"app {job.app!r} is no longer offered by site {self.cfg.site!r}; known: {known}")
            # Finished while no agent was watching? Then take that result: never run it twice.
            earlier = await asyncio.to_thread(read_outcome, str(self.workdir(job) / "outcome.json"))
            if earlier is not None:
                log.info("task %s finished while the agent was away; taking its result", job.task_id)
                await self._finish(job, outcome_from_worker(earlier))
                return
            if recovering:
                execution = None
                if self.engine.reattachable and job.native_id:
                    if self.machines is not None and job.machine and self.machines.bind(job.task_id, job.machine):
                        machine = self.machines.machine_of(job.task_id)
                    spec = self.run_spec(job, app, None, machine)
                    execution = await self.engine.attach(spec, job.native_id)
                if execution is None:
                    await self._db(
                        store.requeue_lost, job.task_id,
                        "the site agent restarted while the task was in flight and its execution is "
                        "gone; running it again (no retry is used)",
                    )
                    return
                log.info("task %s: re-attached to %s", job.task_id, job.native_id)
                if machine is not None:
                    execution.machine = machine.id
            else:
                machine = await self._machine_for(job, app)
                spec = self.run_spec(job, app, None, machine)
                await self._prepare_env(job, app, spec)
                execution = await self._submit(spec, machine)
            self._executions[job.task_id] = execution
            if machine is not None and machine.driver == "slurm":
                how = (f"running on composed machine {machine.id} "
                       f"(a step of Slurm job {machine.realisation.get('job_id')})")
            elif execution.running:
                where = f" on composed machine {machine.id}" if machine is not None else ""
                how = f"running{where} on the {self.engine.name} engine ({execution.native_id})"
            else:
                how = f"submitted to the {self.engine.name} engine as {execution.native_id}"
            await self._submitted.call((
                job.task_id, execution.native_id, spec.workdir, execution.running, how, execution.machine,
            ))
            outcome = await self._wait(job, execution)
            await self._finish(job, outcome)
        except asyncio.CancelledError:
            ex = self._executions.get(job.task_id)
            if ex is not None and not self.engine.reattachable:
                with contextlib.suppress(Exception):
                    await asyncio.shield(ex.cancel())
            raise
        except (AppError, EngineError, CompositionFailed) as exc:
            log.warning("task %s: %s", job.task_id, exc)
            await self._db(store.finish, job.task_id, Outcome(JobStatus.FAILED, error=str(exc),
                                                                retryable=isinstance(exc, EngineError)))
        except Exception as exc:
            log.exception("task %s: internal error", job.task_id)
            await self._db(store.finish, job.task_id,
                           Outcome(JobStatus.FAILED, error=f"site agent error: {type(exc).__name__}: {exc}"))
        finally:
            if machine is not None and self.machines is not None:
                # Only now may the machine serve another task (or expire).
                await self.machines.release(job.task_id)

    async def _wait(self, job: JobView, ex: Execution) -> Outcome:
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(ex.wait())
        running = ex.running
        started = loop.time() if running else None
        last_note = None
        try:
            while True:
                timeout = 1.0
                if job.timeout_s and started is not None:
                    timeout = max(0.0, min(timeout, started + job.timeout_s - loop.time()))
                done, _ = await asyncio.wait({waiter}, timeout=timeout)
                if done:
                    outcome = waiter.result()
                    break
                if not running and ex.running:
                    running, started = True, loop.time()
                    await self._db(self.store.note, job.task_id,  # type: ignore[union-attr]
                                   f"running ({ex.native_id})", True, ex.machine)
                note = ex.note()
                if note and note != last_note:
                    last_note = note
                    await self._db(self.store.note, job.task_id, note)  # type: ignore[union-attr]
                if job.timeout_s and started is not None and loop.time() >= started + job.timeout_s:
                    await ex.cancel()
                    waiter.cancel()
                    with contextlib.suppress(BaseException):
                        await waiter
                    return Outcome(JobStatus.TIMED_OUT, error=f"exceeded its timeout of {job.timeout_s:g}s",
                                   machine=ex.machine)
        finally:
            if not waiter.done():
                waiter.cancel()
        reason = self._cancelling.pop(job.task_id, None)
        if reason is not None and outcome.status is not JobStatus.DONE:
            return Outcome(JobStatus.CANCELLED, error=reason, retryable=False, machine=outcome.machine)
        return outcome

    async def _finish(self, job: JobView, outcome: Outcome) -> None:
        if outcome.status is JobStatus.DONE and outcome.result is not None:
            outcome = await asyncio.to_thread(self._claim_check, job, outcome)
        status = await self._finished.call((job.task_id, outcome))
        if status is not None:
            TASKS_FINISHED.labels(self.cfg.site, status.value).inc()
            log.info("task %s (%s): %s%s", job.task_id, job.app, status.value,
                     f" - {outcome.error}" if outcome.error else "")

    def _claim_check(self, job: JobView, outcome: Outcome) -> Outcome:
        """Large results go by reference: stored as a file, the result event carries its URL."""
        data = json.dumps(outcome.result).encode()
        if len(data) <= self.cfg.results.inline_max_bytes:
            return outcome
        store = self.cfg.results_path
        store.mkdir(parents=True, exist_ok=True)
        path = store / f"{job_dirname(job.task_id)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        shutil.move(tmp, path)
        return Outcome(outcome.status, result=None, result_ref=path.resolve().as_uri(), error=outcome.error,
                       machine=outcome.machine, started_at=outcome.started_at, finished_at=outcome.finished_at)

    # ---- cancellation & housekeeping ------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for task_id in await self._db(self.store.cancel_requests):  # type: ignore[union-attr]
                ex = self._executions.get(task_id)
                if ex is not None and task_id not in self._cancelling:
                    self._cancelling[task_id] = "cancelled by user (reflexarc jobs cancel)"
                    log.info("task %s: cancelling on request", task_id)
                    await ex.cancel()

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel a running task of this agent (returns False if it is not running here)."""
        ex = self._executions.get(task_id)
        if ex is None:
            return False
        self._cancelling[task_id] = reason
        await ex.cancel()
        return True

    # ---- publishing -----------------------------------------------------------------------------------
    async def _publish(self, producer: Any) -> None:
        while True:
            await nap(self._outbox_wake, 1.0)
            self._outbox_wake.clear()
            try:
                await self._flush_outbox(producer)
            except Exception as exc:
                log.warning("publishing events failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _flush_outbox(self, producer: Any) -> None:
        store = self.store
        assert store is not None
        while True:
            pending = await self._db(store.pending_events, 500)
            if not pending:
                return
            futs = [await send_event(producer, p.topic, p.envelope, key=p.key) for p in pending]
            await asyncio.gather(*futs)
            await self._db(store.mark_published, [p.id for p in pending])

    async def _settle_interrupted_results(self) -> None:
        """Results whose publication a crash interrupted may be on Kafka already: look before resending."""
        store = self.store
        assert store is not None
        pending = await self._db(store.pending_events, 100000, "result")
        if not pending:
            return
        wanted = {p.event_id: p.id for p in pending}
        found = await find_published(self.kafka, self.topics.kafka_results, set(wanted))
        if found:
            log.info("%d result(s) were published before the last stop; not sending them again", len(found))
            await self._db(store.mark_published, [wanted[i] for i in found])


async def find_published(settings: KafkaSettings, topic: str, ids: set[str], timeout: float = 30.0) -> set[str]:
    """Which of ``ids`` (CloudEvent ids) are already on ``topic`` (reads it from the start)."""
    from aiokafka import TopicPartition

    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    found: set[str] = set()
    try:
        await consumer.topics()  # fetches metadata for every topic
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return found
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        empty = 0
        # Some brokers report wrong end offsets; "two empty polls in a row" means caught up.
        while empty < 2 and loop.time() < deadline and found != ids:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            recs = [r for rs in batches.values() for r in rs]
            empty = 0 if recs else empty + 1
            for r in recs:
                for k, v in r.headers or ():
                    if k == "ce_id":
                        eid = v.decode(errors="replace")
                        if eid in ids:
                            found.add(eid)
                        break
    finally:
        await consumer.stop()
    return found
