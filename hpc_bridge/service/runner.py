"""The runner: one attempt of one task, from its run spec to its recorded outcome.

::

    claimed job ─▶ outcome already on disk? ─▶ (yes) record it: never run a finished task twice
                    │ (no)
                    ▼
          composed machine (if it needs one) ─▶ packed environment ─▶ engine.submit
                    │
                    ▼  recorded: submitted / running (not waited for: the outcome is queued after it)
          wait (timeout, notes, cancel) ─▶ engine is free again ─▶ large result stored by reference
                    │
                    ▼
          outcome recorded (retry, or the end with its result) ─▶ outbox

An attempt of a job that was in flight when a previous agent stopped is
*recovering*: it is re-attached if the engine can find it again, else
queued again without using a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from reflexarc.events import stable_id
from reflexarc.hpc_bridge.apps import AppError, AppSpec, choose_implementation, mpi_argv, render_argv
from reflexarc.hpc_bridge.compose.model import Machine
from reflexarc.hpc_bridge.engines import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.machines import machine_environment, offer_of
from reflexarc.hpc_bridge.metrics import TASKS_FINISHED, observe_task
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.machines import ComposedMachines, CompositionFailed
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.staging import is_store_url, stage_in, stage_out
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import JobView, Outcome
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome

log = logging.getLogger(__name__)

_SAFE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

#: Reason given to a job whose execution a restart lost.
LOST = (
    "the site agent restarted while the task was in flight and its execution is gone; "
    "running it again (no retry is used)"
)


class Slot(Protocol):
    """An attempt's place at the engine (the scheduler's): taken before submitting, given back after."""

    async def take(self) -> None:
        """Wait until the engine has room for this attempt."""

    def give_back(self) -> None:
        """The engine is done with the attempt (or never got it); idempotent."""


def job_dirname(task_id: str) -> str:
    """A file-system-safe folder name for a task id."""
    return task_id if _SAFE_RE.match(task_id) and task_id not in (".", "..") else stable_id(task_id)


class Runner:
    """Runs attempts of the site's tasks on its engine (:meth:`run` is one attempt)."""

    def __init__(
        self,
        cfg: SiteConfig,
        apps: dict[str, AppSpec],
        engine: Engine,
        jobs: AsyncJobStore,
        machines: ComposedMachines | None,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        #: Called when an attempt put its job back in the queue (a retry, or lost in a restart).
        self.on_queued = on_queued
        self.apps = apps
        self.engine = engine
        self.jobs = jobs
        self.machines = machines
        self.work_root = cfg.state_path / "work"
        self._work_root = str(self.work_root)  # paths as text: pathlib costs µs a call, the hot path makes several
        #: Executions in progress, by task id (for cancelling).
        self.executions: dict[str, Execution] = {}
        # Attempts claimed and not submitted yet (waiting for a machine, an environment or room).
        self._waiting: set[str] = set()
        self._cancelling: dict[str, str] = {}
        self._envs: object | None = None
        self._finished = {s: TASKS_FINISHED.labels(cfg.site, s.value) for s in JobStatus}

    # ---- what runs ------------------------------------------------------------------------------
    def workdir(self, job: JobView) -> str:
        """Work directory of the current attempt of ``job`` (its outcome file is in it)."""
        return f"{self._work_root}/{job_dirname(job.task_id)}/{max(job.attempt, 1)}"

    def outcome_path(self, job: JobView) -> str:
        """Where the worker writes the outcome of the current attempt of ``job``."""
        return f"{self.workdir(job)}/outcome.json"

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
            task_id=job.task_id,
            attempt=max(job.attempt, 1),
            kind=app.kind,
            workdir=workdir,
            result_path=f"{workdir}/outcome.json",
            function=impl.function if impl else None,
            argv=argv,
            args=req.args,
            python=python,
            environment=environment,
            cpus=cpus,
            gpus=impl.gpus if impl else app.gpus,
            memory_gb=memory,
            walltime_s=req.resources.walltime_s or app.walltime_s or job.timeout_s,
            timeout_s=job.timeout_s,
            # A Dask worker is a shared process: run in a child so the machine's variables apply.
            isolate=machine is not None and self.engine.name == "dask" and app.kind == "python",
            # The engine reserves every rank's cores (a pilot: in one allocation), not just the launcher's.
            ranks=app.mpi.ranks if app.mpi else 1,
            ranks_per_node=(app.mpi.ranks_per_node or 0) if app.mpi else 0,
        )

    async def _prepare_env(self, job: JobView, app: AppSpec, spec: RunSpec) -> None:
        """Point ``spec`` at the app's packed environment (built once, cached by hash)."""
        if app.env is None or not app.env.pack:
            return
        from reflexarc.hpc_bridge.envpack import EnvError, EnvManager
        from reflexarc.hpc_bridge.worker import ensure_unpacked

        if self._envs is None:
            self._envs = EnvManager(self.cfg.env_cache_path)
        envs = self._envs
        assert isinstance(envs, EnvManager)
        await self.jobs.note(job.task_id, "preparing its packed environment")
        try:
            packed = await asyncio.to_thread(envs.pack, job.app, app)
        except EnvError as exc:
            raise AppError(f"packed environment of app {job.app!r}: {exc}") from exc
        spec.env_tarball, spec.env_hash = str(packed.tarball), packed.hash[:24]
        if self.engine.name == "local":
            # This node runs it: unpack here, start workers with that interpreter.
            spec.python = await asyncio.to_thread(ensure_unpacked, spec.env_tarball, spec.env_hash, None)

    # ---- one attempt ----------------------------------------------------------------------------------
    async def run(self, job: JobView, recovering: bool, earlier: dict[str, object] | None, slot: Slot) -> None:
        """Run one attempt of ``job`` and record its outcome; never raises but for cancellation.

        ``earlier``: the outcome found on disk for this attempt (it finished while no agent was
        watching: it is recorded, not run again). ``slot`` is taken just before the engine gets the
        attempt and given back as soon as the engine is done with it, before its outcome is
        recorded, so that another attempt starts meanwhile.
        """
        machine: Machine | None = None
        execution: Execution | None = None
        self._waiting.add(job.task_id)
        try:
            app = self.apps.get(job.app)
            if app is None:
                known = ", ".join(sorted(self.apps)) or "none"
                raise AppError(f"app {job.app!r} is no longer offered by site {self.cfg.site!r}; known: {known}")
            if earlier is not None:
                log.info("task %s finished while the agent was away; taking its result", job.task_id)
                slot.give_back()
                await self._finish(job, outcome_from_worker(earlier))
                return
            if recovering:
                if self.engine.reattachable and job.native_id:
                    if self.machines is not None:
                        machine = self.machines.rebind(job)
                    await slot.take()
                    execution = await self.engine.attach(self.run_spec(job, app, None, machine), job.native_id)
                if execution is None:
                    slot.give_back()
                    await self.jobs.requeue_lost(job.task_id, LOST)
                    self.on_queued()
                    return
                log.info("task %s: re-attached to %s", job.task_id, job.native_id)
                if machine is not None:
                    execution.machine = machine.id
                spec_workdir = self.workdir(job)
            else:
                if self.machines is not None:
                    machine = await self.machines.machine_for(job, app, lambda text: self.jobs.note(job.task_id, text))
                spec = self.run_spec(job, app, None, machine)
                await self._prepare_env(job, app, spec)
                await stage_in(app, spec)  # referenced arguments become local files (hpc_bridge/staging.py)
                await slot.take()
                cancelled = self._cancelling.pop(job.task_id, None)
                if cancelled is not None:
                    # Asked to cancel while it waited: it never starts.
                    slot.give_back()
                    await self._finish(job, Outcome(JobStatus.CANCELLED, error=cancelled, retryable=False))
                    return
                if machine is not None and self.machines is not None:
                    execution = await self.machines.submit(spec, machine, self.engine)
                else:
                    execution = await self.engine.submit(spec)
                spec_workdir = spec.workdir
            self._waiting.discard(job.task_id)
            self.executions[job.task_id] = execution
            how = self._how(execution, machine)
            if self.engine.reattachable:
                # Its native id must be durable before anything else: a restarted agent re-attaches by it.
                await self.jobs.submitted(
                    job.task_id, execution.native_id, spec_workdir, execution.running, how, execution.machine
                )
            else:
                # Lost with the agent anyway: recorded with the outcome that follows (one transaction).
                self.jobs.submitted_later(
                    job.task_id, execution.native_id, spec_workdir, execution.running, how, execution.machine
                )
            outcome = await self._wait(job, execution)
            self._forget(job.task_id, execution)
            slot.give_back()
            await self._finish(job, outcome)
        except asyncio.CancelledError:
            if execution is not None and self.executions.get(job.task_id) is execution and not self.engine.reattachable:
                with contextlib.suppress(Exception):
                    await asyncio.shield(execution.cancel())
            raise
        except (AppError, EngineError, CompositionFailed) as exc:
            log.warning("task %s: %s", job.task_id, exc)
            slot.give_back()
            await self._finish(job, Outcome(JobStatus.FAILED, error=str(exc), retryable=isinstance(exc, EngineError)))
        except Exception as exc:
            log.exception("task %s: internal error", job.task_id)
            slot.give_back()
            await self._finish(job, Outcome(JobStatus.FAILED, error=f"site agent error: {type(exc).__name__}: {exc}"))
        finally:
            self._waiting.discard(job.task_id)
            self._forget(job.task_id, execution)
            slot.give_back()
            if machine is not None and self.machines is not None:
                # Only now may the machine serve another task (or expire).
                await self.machines.release(job.task_id)

    def _forget(self, task_id: str, execution: Execution | None) -> None:
        """The attempt's execution is over (a newer attempt of the same task may have started since)."""
        if execution is not None and self.executions.get(task_id) is execution:
            del self.executions[task_id]
            self._cancelling.pop(task_id, None)

    def _how(self, execution: Execution, machine: Machine | None) -> str:
        """The reason recorded when the engine took the attempt."""
        if machine is not None and machine.driver == "slurm":
            return f"running on composed machine {machine.id} (a step of Slurm job {machine.realisation.get('job_id')})"
        if execution.running:
            where = f" on composed machine {machine.id}" if machine is not None else ""
            return f"running{where} on the {self.engine.name} engine ({execution.native_id})"
        return f"submitted to the {self.engine.name} engine as {execution.native_id}"

    async def _wait(self, job: JobView, ex: Execution) -> Outcome:
        if ex.running and type(ex).note is Execution.note:
            outcome = await self._wait_for_end(job, ex)
        else:
            outcome = await self._watch(job, ex)
        reason = self._cancelling.pop(job.task_id, None)
        if reason is not None and outcome.status is not JobStatus.DONE:
            return Outcome(JobStatus.CANCELLED, error=reason, retryable=False, machine=outcome.machine)
        return outcome

    async def _wait_for_end(self, job: JobView, ex: Execution) -> Outcome:
        """An attempt already running with nothing to report on the way: its end, or its timeout."""
        try:
            async with asyncio.timeout(job.timeout_s):
                return await ex.wait()
        except TimeoutError:
            await ex.cancel()
            return Outcome(JobStatus.TIMED_OUT, error=f"exceeded its timeout of {job.timeout_s:g}s", machine=ex.machine)

    async def _watch(self, job: JobView, ex: Execution) -> Outcome:
        """An attempt that may still be pending or has notes: checked every second until it ends."""
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
                    await self.jobs.note(job.task_id, f"running ({ex.native_id})", True, ex.machine)
                note = ex.note()
                if note and note != last_note:
                    last_note = note
                    await self.jobs.note(job.task_id, note)
                if job.timeout_s and started is not None and loop.time() >= started + job.timeout_s:
                    await ex.cancel()
                    waiter.cancel()
                    with contextlib.suppress(BaseException):
                        await waiter
                    return Outcome(
                        JobStatus.TIMED_OUT, error=f"exceeded its timeout of {job.timeout_s:g}s", machine=ex.machine
                    )
        finally:
            if not waiter.done():
                waiter.cancel()
        return outcome

    async def _finish(self, job: JobView, outcome: Outcome) -> None:
        if outcome.status is JobStatus.DONE and outcome.result is not None:
            outcome = await self._claim_check(job, outcome)
        status = await self.jobs.finish(job.task_id, outcome)
        if status is JobStatus.QUEUED:
            self.on_queued()
        if status is not None:
            self._finished[status].inc()
            observe_task(self.cfg.site, job.app, job.created_at, outcome.started_at, outcome.finished_at)
            # A done task is in its JobState events; the log keeps what needs a look.
            log.log(
                logging.DEBUG if status is JobStatus.DONE else logging.INFO,
                "task %s (%s): %s%s",
                job.task_id,
                job.app,
                status.value,
                f" - {outcome.error}" if outcome.error else "",
            )

    async def _claim_check(self, job: JobView, outcome: Outcome) -> Outcome:
        """Large results go by reference: stored as a file, the result event carries its URL."""
        data = json.dumps(outcome.result).encode()
        if len(data) <= self.cfg.results.inline_max_bytes:
            return outcome
        if is_store_url(self.cfg.results.store):  # an object store (s3://...): hpc_bridge/staging.py uploads it
            return await stage_out(outcome, str(self.cfg.results.store), job_dirname(job.task_id))
        store = self.cfg.results_path
        path = Path(store) / f"{job_dirname(job.task_id)}.json"

        def write() -> None:
            store.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            shutil.move(tmp, path)

        await asyncio.to_thread(write)
        return Outcome(
            outcome.status,
            result=None,
            result_ref=path.resolve().as_uri(),
            error=outcome.error,
            machine=outcome.machine,
            started_at=outcome.started_at,
            finished_at=outcome.finished_at,
        )

    # ---- cancellation ---------------------------------------------------------------------------------
    async def cancel(self, task_id: str, reason: str) -> bool:
        """Stop an attempt of this agent (False if it has none); it ends ``cancelled`` with ``reason``.

        One still waiting to be submitted is not started at all.
        """
        ex = self.executions.get(task_id)
        if ex is None:
            if task_id not in self._waiting:
                return False
            self._cancelling[task_id] = reason
            return True
        self._cancelling[task_id] = reason
        await ex.cancel()
        return True

    def has(self, task_id: str) -> bool:
        """True while this agent holds an attempt of ``task_id`` (waiting or at the engine)."""
        return task_id in self.executions or task_id in self._waiting

    def cancelling(self, task_id: str) -> bool:
        """True once a cancel of ``task_id`` was asked for (and its attempt has not ended)."""
        return task_id in self._cancelling

    def read_outcomes(self, jobs: list[JobView]) -> list[dict[str, object] | None]:
        """The outcomes already on disk for these attempts (blocking: call it in a thread)."""
        return [read_outcome(self.outcome_path(j)) for j in jobs]
