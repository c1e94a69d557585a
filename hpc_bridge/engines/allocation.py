"""Run one task inside an existing Slurm allocation (a composed machine's holder job).

The Slurm compose driver realises a machine as a holder job that owns the
node's cores and GPUs. A task for that machine runs as a job step of it::

    srun --jobid=<holder> --overlap --nodes=1 --ntasks=1 --cpus-per-task=N \\
         --job-name=rx-task-<task> python worker.py run spec.json

A step rather than a new batch job: the step starts in ~0.1 s (no scheduling
cycle), cannot land anywhere but on the composed machine, and Slurm gives it
the allocation's GPUs (it sets ``CUDA_VISIBLE_DEVICES`` for the step). The
worker writes its outcome file before exiting, as for every engine.

``srun`` is a child of the agent (it dies with it). Slurm keeps a step whose
``srun`` was killed, so after an agent crash :func:`cancel_task_steps` removes
such orphans before their tasks are run again (a finished one left its
outcome on disk and is not run again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from reflexarc.hpc_bridge import worker as worker_module
from reflexarc.hpc_bridge.engines.base import EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome
from reflexarc.process import die_with_parent

log = logging.getLogger(__name__)

#: Job-step names of reflexarc tasks start with this.
STEP_PREFIX = "rx-task-"


def srun_argv(spec: RunSpec, job_id: str, python: str | None = None) -> list[str]:
    """The ``srun`` command line running ``spec`` as a step of Slurm job ``job_id``."""
    workdir = Path(spec.workdir)
    return [
        "srun",
        f"--jobid={job_id}",
        "--overlap",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={spec.cpus}",
        f"--job-name={STEP_PREFIX}{spec.task_id[:40]}",
        f"--chdir={workdir}",
        f"--output={workdir / 'srun.out'}",
        f"--error={workdir / 'srun.err'}",
        "--kill-on-bad-exit=1",
        spec.python or python or sys.executable,
        worker_module.__file__,
        "run",
        str(workdir / "spec.json"),
    ]


async def run_in_allocation(
    spec: RunSpec, job_id: str, env: Mapping[str, str] | None = None, machine: str | None = None
) -> Execution:
    """Start ``spec`` as a step of the allocation ``job_id``; the execution is running at once."""
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(spec.to_json())
    argv = srun_argv(spec, job_id)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
    except OSError as exc:
        raise EngineError(f"cannot run srun for Slurm job {job_id}: {exc} (is slurm-client installed?)") from exc
    return _StepExecution(proc, spec, job_id, machine)


class _StepExecution(Execution):
    def __init__(self, proc: asyncio.subprocess.Process, spec: RunSpec, job_id: str, machine: str | None) -> None:
        self.proc = proc
        self.spec = spec
        self.job_id = job_id
        self.native_id = f"srun:{job_id}:{proc.pid}"
        self.machine = machine
        self._cancelled = False

    async def wait(self) -> Outcome:
        assert self.proc.stderr is not None
        err = (await self.proc.stderr.read()).decode(errors="replace")
        code = await self.proc.wait()
        data = await asyncio.to_thread(read_outcome, self.spec.result_path)
        if data is not None:
            return outcome_from_worker(data)
        if self._cancelled:
            return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
        with contextlib.suppress(OSError):
            err += Path(self.spec.workdir, "srun.err").read_text(errors="replace")
        return Outcome(
            JobStatus.FAILED,
            machine=self.machine,
            error=f"step of Slurm job {self.job_id} ended (srun exit code {code}) without an outcome"
            + (f": {err.strip()[-1500:]}" if err.strip() else ""),
        )

    async def cancel(self) -> None:
        # srun forwards SIGTERM to the step's tasks and ends the step.
        self._cancelled = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 5)


def cancel_task_steps(job_id: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Cancel the task steps (``rx-task-*``) left in allocation ``job_id``; returns their step ids.

    Blocking (runs ``squeue``/``scancel``): call it in a thread.
    """
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(
        ["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
        check=False,
    ).stdout
    steps = [sid for sid, _, name in (ln.partition("|") for ln in out.splitlines()) if name.startswith(STEP_PREFIX)]
    if steps:
        subprocess.run(["scancel", *steps], capture_output=True, env=full_env, timeout=30, check=False)
        log.info("cancelled %d orphaned task step(s) of Slurm job %s: %s", len(steps), job_id, ", ".join(steps))
    return steps
