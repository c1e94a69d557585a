"""The ``batch`` engine: one batch job per task through PSI/J (Slurm, PBS, LSF, or local).

Each attempt becomes a batch job running ``python worker.py run spec.json``
in the task's work directory; the worker writes the outcome file there. The
scheduler's job id is recorded, so a restarted agent re-attaches to jobs
still queued or running. The scheduler's word is kept visible: a pending job
shows Slurm's pending reason, a job Slurm killed at its time limit is
``timed_out``, and a job cancelled outside the agent (``scancel``) is
``cancelled`` with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from reflexarc.hpc_bridge import worker as worker_module
from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.site_config import BatchEngineSettings
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome

log = logging.getLogger(__name__)


class BatchEngine(Engine):
    """PSI/J executor for ``settings.scheduler``; re-attachable across agent restarts."""

    name = "batch"
    reattachable = True

    def __init__(self, settings: BatchEngineSettings, workdir_root: str) -> None:
        self.settings = settings
        self.psij_dir = Path(workdir_root) / "psij"
        self.executor: Any = None
        self._pending: dict[str, _BatchExecution] = {}
        self._reasons_task: asyncio.Task[None] | None = None

    @property
    def capacity(self) -> int:
        """Jobs kept in the scheduler at once."""
        return self.settings.max_running

    async def start(self) -> None:
        """Create the PSI/J executor (it polls the scheduler in its own thread)."""
        import psij
        from psij.executors.batch.batch_scheduler_executor import BatchSchedulerExecutorConfig

        os.environ.update(self.settings.env)
        self.psij_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.scheduler == "local":
            config: Any = psij.JobExecutorConfig(work_directory=self.psij_dir)
        else:
            config = BatchSchedulerExecutorConfig(
                work_directory=self.psij_dir,
                queue_polling_interval=max(1, round(self.settings.poll_interval_s)),
                initial_queue_polling_delay=1,
                keep_files=True,  # the exit-code file must survive for a re-attach
            )
        try:
            self.executor = await asyncio.to_thread(
                psij.JobExecutor.get_instance, self.settings.scheduler, config=config
            )
        except Exception as exc:
            raise EngineError(f"cannot start the PSI/J {self.settings.scheduler} executor: {exc}") from exc
        if self.settings.scheduler == "slurm":
            self._reasons_task = asyncio.create_task(self._pending_reasons())

    def _job(self, spec: RunSpec) -> Any:
        import psij

        workdir = Path(spec.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        spec_path = workdir / "spec.json"
        spec_path.write_text(spec.to_json())
        python = spec.python or self.settings.python or sys.executable
        cpus = spec.cpus
        walltime = spec.walltime_s or spec.timeout_s or 3600.0
        ranks = max(1, spec.ranks)
        if ranks > 1:
            # An MPI app: the allocation holds its ranks; the worker (one process, on the first
            # node) runs the launcher, which starts the ranks inside this allocation.
            per_node = spec.ranks_per_node or ranks
            resources = psij.ResourceSpecV1(
                node_count=-(-ranks // per_node),
                process_count=ranks,
                cpu_cores_per_process=cpus,
                memory=int(spec.memory_gb * 2**30) if spec.memory_gb else None,
            )
        else:
            resources = psij.ResourceSpecV1(
                node_count=1,
                process_count=1,
                cpu_cores_per_process=cpus,
                gpu_cores_per_process=spec.gpus or None,
                memory=int(spec.memory_gb * 2**30) if spec.memory_gb else None,
            )
        attrs = psij.JobAttributes(
            duration=timedelta(seconds=max(60.0, walltime)),  # schedulers count whole minutes
            queue_name=self.settings.queue,
            account=self.settings.account,
        )
        jspec = psij.JobSpec(
            executable=python,
            arguments=[worker_module.__file__, "run", str(spec_path)],
            directory=workdir,
            name=f"rx-{spec.task_id[:40]}",
            inherit_environment=True,
            environment=dict(spec.environment) or None,
            stdout_path=workdir / "batch.out",
            stderr_path=workdir / "batch.err",
            resources=resources,
            attributes=attrs,
            launcher="single",
        )
        return psij.Job(jspec)

    async def submit(self, spec: RunSpec) -> Execution:
        """``sbatch`` (or qsub/bsub) one job for this attempt."""
        job = self._job(spec)
        ex = _BatchExecution(self, job, spec)
        try:
            await asyncio.to_thread(self.executor.submit, job)
        except Exception as exc:
            raise EngineError(f"{self.settings.scheduler} refused the job: {exc}") from exc
        ex.native_id = str(job.native_id)
        self._pending[ex.native_id] = ex
        return ex

    async def attach(self, spec: RunSpec, native_id: str) -> Execution | None:
        """Follow a job a previous agent submitted."""
        import psij

        if self.settings.scheduler == "local":
            return None  # local PSI/J processes die with the agent
        job = psij.Job()
        ex = _BatchExecution(self, job, spec)
        ex.native_id = native_id
        try:
            await asyncio.to_thread(self.executor.attach, job, native_id)
        except Exception as exc:
            log.warning("cannot re-attach to %s job %s: %s", self.settings.scheduler, native_id, exc)
            return None
        self._pending[native_id] = ex
        return ex

    async def _pending_reasons(self) -> None:
        # PSI/J gives no reason for a queued job; ask squeue, so nothing waits without one.
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            waiting = {nid: ex for nid, ex in self._pending.items() if not ex.running and not ex.done}
            if not waiting:
                continue
            try:
                out = await asyncio.to_thread(
                    subprocess.run,
                    ["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(waiting)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.stdout.splitlines():
                nid, _, rest = line.partition("|")
                state, _, reason = rest.partition("|")
                if nid in waiting and state == "PENDING":
                    waiting[nid].pending_reason = f"pending in Slurm job {nid}: {reason}"

    async def close(self) -> None:
        """Stop polling; jobs stay in the scheduler (a restarted agent re-attaches)."""
        if self._reasons_task:
            self._reasons_task.cancel()
            await asyncio.gather(self._reasons_task, return_exceptions=True)
        self._pending.clear()


class _BatchExecution(Execution):
    def __init__(self, engine: BatchEngine, job: Any, spec: RunSpec) -> None:
        self.engine = engine
        self.job = job
        self.spec = spec
        self.done = False
        self.pending_reason: str | None = None
        self._active = False
        self._cancel_asked = False
        loop = asyncio.get_running_loop()
        self._final: asyncio.Future[Any] = loop.create_future()

        def on_status(_job: Any, status: Any) -> None:  # PSI/J's polling thread
            loop.call_soon_threadsafe(self._update, status)

        job.set_job_status_callback(on_status)

    def _update(self, status: Any) -> None:
        from psij import JobState

        if status.state == JobState.ACTIVE:
            self._active = True
        if status.state.final and not self._final.done():
            self._final.set_result(status)

    @property
    def running(self) -> bool:
        return self._active

    def note(self) -> str | None:
        return self.pending_reason

    async def wait(self) -> Outcome:
        from psij import JobState

        try:
            status = await self._final
        finally:
            self.done = True
            if self.native_id:
                self.engine._pending.pop(self.native_id, None)
        nid = self.native_id
        sched = self.engine.settings.scheduler
        outcome = await asyncio.to_thread(read_outcome, self.spec.result_path)
        if outcome is not None:
            return outcome_from_worker(outcome)
        message = status.message or ""
        if status.state == JobState.CANCELED:
            who = "the site agent" if self._cancel_asked else f"someone outside the site agent (e.g. scancel {nid})"
            return Outcome(JobStatus.CANCELLED, error=f"{sched} job {nid} was cancelled by {who}", retryable=False)
        if "time limit" in message.lower():
            return Outcome(JobStatus.TIMED_OUT, error=f"{sched} job {nid} exceeded its walltime: {message}")
        err = ""
        with contextlib.suppress(OSError):
            err = Path(self.spec.workdir, "batch.err").read_text(errors="replace")[-2000:]
        return Outcome(
            JobStatus.FAILED,
            error=f"{sched} job {nid} ended {status.state} without an outcome"
            + (f": {message}" if message else "")
            + (f"; stderr: {err.strip()}" if err.strip() else ""),
        )

    async def cancel(self) -> None:
        self._cancel_asked = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.engine.executor.cancel, self.job)
