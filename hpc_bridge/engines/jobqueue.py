"""dask-jobqueue pilots: each allocation is a ``SLURMJob`` whose Dask workers join the agent's scheduler.

The agent starts a ``distributed`` scheduler as its child process (it dies
with the agent), on the address workers connect back to
(``address``/``interface``; the port is ``port`` or a free one). Each allocation the manager asks for is one
dask-jobqueue ``SLURMJob`` (dask-jobqueue writes the batch script and calls
``sbatch``): one Dask worker process per slot, one thread each, named after
the allocation, so the manager knows which worker belongs to which job and
sends each attempt to exactly the worker it chose (``workers=[name]``).

* GPUs: the job asks ``--gres=gpu:N``; every worker declares the Dask
  resource ``GPU=N``; a task asking for GPUs is submitted with
  ``resources={"GPU": n}`` and gets the devices the manager reserved for it
  (``CUDA_VISIBLE_DEVICES``, in a child process).
* Several nodes per allocation: one ``srun`` task per node starts that
  node's workers (named ``<allocation>-n<node>-<i>``).
* A worker that dies mid-task (killed, out of memory, the job's end) fails
  the attempt with the reason (``allowed-failures`` is 0: no silent re-run);
  the app's retry policy decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from reflexarc.hpc_bridge.allocations import Allocation, Placement, WorkerInfo
from reflexarc.hpc_bridge.engines.base import EngineError
from reflexarc.hpc_bridge.engines.pilot import PilotBackend, RemoteTask, TakenBack
from reflexarc.hpc_bridge.engines.pilot_worker import run_pilot_task
from reflexarc.hpc_bridge.site_config import JobqueueSettings
from reflexarc.hpc_bridge.worker import RunSpec, read_outcome
from reflexarc.process import die_with_parent, free_port

log = logging.getLogger(__name__)

#: This module, preloaded by the scheduler and the workers (see :func:`dask_setup`).
PRELOAD = __name__
_ALLOC_RE = re.compile(r"^(rxp-[0-9a-f]{6}-a\d+)(?:-|$)")


def job_kwargs(s: JobqueueSettings, scheduler_address: str, name: str, log_dir: Path) -> dict[str, Any]:
    """Arguments of dask-jobqueue's ``SLURMJob`` for one allocation named ``name``."""
    processes = s.processes or s.cores_per_node
    directives = list(s.job_directives)
    skip = []
    if s.nodes_per_allocation > 1:
        # One srun task per node starts that node's workers (see _PilotSLURMJob).
        skip.append("-n 1")
        directives += [f"--nodes={s.nodes_per_allocation}", "--ntasks-per-node=1"]
    if s.gpus_per_node:
        directives.append(f"--gres=gpu:{s.gpus_per_node}")
    if s.memory_per_node:
        memory, job_mem = s.memory_per_node, None
    else:
        # No memory request: Slurm's default applies, and Dask sets no memory limit.
        memory, job_mem = "0", "0"
        skip.append("--mem")
    extra = ["--resources", f"GPU={s.gpus_per_node}", "--preload", PRELOAD]
    return {
        "scheduler": scheduler_address,
        "name": name,
        "job_name": name,
        "cores": s.cores_per_node,
        "processes": processes,
        "memory": memory,
        "job_mem": job_mem,
        "walltime": s.walltime,
        "queue": s.partition,
        "account": s.account,
        "job_extra_directives": directives,
        "job_directives_skip": skip,
        "job_script_prologue": list(s.worker_init),
        "python": s.python or sys.executable,
        "death_timeout": s.death_timeout_s,
        "local_directory": s.local_directory,
        "log_directory": str(log_dir),
        "interface": s.interface,
        "worker_extra_args": extra,
        "nanny": True,
    }


def allocation_of(worker_name: str) -> str | None:
    """The allocation a worker belongs to, from its name (``rxp-<token>-a<N>[-...]``)."""
    m = _ALLOC_RE.match(worker_name)
    return m.group(1) if m else None


def _job_class() -> Any:
    from dask_jobqueue.slurm import SLURMJob

    class _PilotSLURMJob(SLURMJob):
        """A SLURMJob that starts workers on every node of a multi-node allocation."""

        def __init__(self, *args: Any, nodes: int = 1, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # dask_jobqueue's Job is unannotated
            if nodes > 1:
                # Each node's workers get a distinct name: <allocation>-n<node id>[-<i>].
                cmd = self._command_template.replace(f"--name {self.name}", f"--name {self.name}-n$SLURM_NODEID")
                self._command_template = (
                    f"srun --nodes={nodes} --ntasks-per-node=1 bash -c {shlex.quote('exec ' + cmd)}"
                )

    return _PilotSLURMJob


#: The batching window of the client's, the scheduler's and the workers' message streams
#: (distributed's own: 10 ms client -> scheduler, 5 ms scheduler -> worker, 2 ms worker -> scheduler).
#: A message sent right after another waits out the window; a pilot sends one task per freed slot,
#: so each task would wait for some of them.
SEND_INTERVAL_S = 0.001
#: How long a finished task's key may wait to be released together with the next task's submit.
RELEASE_DELAY_S = 0.05


def dask_setup(server: Any) -> None:
    """Preload of the pilots' scheduler and workers.

    Shorter batching windows (see ``SEND_INTERVAL_S``), and on the scheduler the
    ``rx_workers`` handler: the connected workers in a few bytes, and nothing at
    all while they have not changed. (The manager asks several times a second;
    ``identity`` serialises every worker's metrics, which cost the scheduler and
    the agent about as much CPU as the tasks' own messages.)
    """
    from distributed import Scheduler, Worker
    from distributed.diagnostics.plugin import SchedulerPlugin

    if isinstance(server, Worker):  # its stream to the scheduler
        server.batched_stream.interval = SEND_INTERVAL_S
    elif isinstance(server, Scheduler):  # its stream to each worker, made as the worker joins

        class _Pilots(SchedulerPlugin):
            version = 0

            def add_worker(self, scheduler: Any, worker: str) -> None:
                self.version += 1
                comm = scheduler.stream_comms.get(worker)
                if comm is not None:
                    comm.interval = SEND_INTERVAL_S

            def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
                self.version += 1

        plugin = _Pilots()

        def rx_workers(since: int = -1) -> dict[str, Any]:
            if since == plugin.version:
                return {"version": since}
            return {
                "version": plugin.version,
                "workers": [
                    [ws.address, str(ws.name), ws.host, ws.nthreads, int((ws.resources or {}).get("GPU", 0))]
                    for ws in server.workers.values()
                ],
            }

        server.add_plugin(plugin, name="rx-pilots")
        server.handlers["rx_workers"] = rx_workers


class _DaskTask(RemoteTask):
    def __init__(self, fut: Any, outcome_path: str, backend: DaskJobqueueBackend) -> None:
        self.fut = fut
        self.outcome_path = outcome_path
        self.backend = backend
        self.abandoned = False
        self._cancelling: asyncio.Future[None] | None = None

    async def result(self) -> dict[str, Any]:
        from distributed import wait

        try:
            await wait(self.fut)
            if self.abandoned:
                raise TakenBack(self.fut.key)
            if self.fut.status == "finished":
                # The worker wrote the outcome file before it returned: reading it saves the round trip
                # of fetching the result from the worker (half of a warm task's cost).
                data = await asyncio.to_thread(read_outcome, self.outcome_path)
                if data is not None:
                    return data
            result: dict[str, Any] = await self.fut  # raises the worker's error (e.g. KilledWorker)
            return result
        finally:
            # The outcome is in hand: let the scheduler forget the task, after the next task's submit.
            self.backend.release_later(self.fut)

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            await self.fut.cancel()

    def abandon(self) -> None:
        # Cancelling the key drops it from the worker's queue and ends wait() in result() at once.
        self.abandoned = True
        self._cancelling = asyncio.ensure_future(self.cancel())


class DaskJobqueueBackend(PilotBackend):
    """A Dask scheduler (a child process of the agent) plus one ``SLURMJob`` per allocation."""

    kind = "dask"
    replaces_worker_on_cancel = True

    def __init__(self, settings: JobqueueSettings, address: str, workdir: Path) -> None:
        super().__init__(settings, address, workdir)
        self.s = settings
        self.scheduler_address = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.client: Any = None
        self.jobs: dict[str, Any] = {}
        self._to_release: list[Any] = []
        self._workers: dict[str, list[WorkerInfo]] = {}
        self._workers_version = -1
        self._release_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """Start the scheduler on the workers' address, and a client of it.

        The scheduler runs in its own process (dying with the agent), not in the
        agent's event loop: it gets a core of its own and is never delayed by the
        agent's work (Kafka, the job database).
        """
        from distributed import Client

        port = self.s.port or free_port(self.address)
        where = f"{self.address}:{port}"
        self.scheduler_address = f"tcp://{where}"
        log_path = self.workdir / "scheduler.log"
        argv = [
            self.s.python or sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            self.address,
            "--port",
            str(port),
            "--no-dashboard",
            "--preload",
            PRELOAD,
        ]
        # A worker's death fails its task with the reason; the app's policy decides on a retry.
        env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        with open(log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=die_with_parent,
            )
        try:
            self.client = await Client(self.scheduler_address, asynchronous=True, timeout=30)
        except (OSError, TimeoutError) as exc:
            await self.close()
            tail = log_path.read_text(errors="replace")[-1500:]
            raise EngineError(
                f"the Dask scheduler did not start on {where} (engine.dask.jobqueue.port, address "
                f"or interface): {exc}; its log: {tail}"
            ) from exc
        # Each freed slot sends a release and then the next task's submit: with distributed's 10 ms window
        # the submit waits for most of it (a message right after another waits out the window).
        with contextlib.suppress(AttributeError):
            self.client.scheduler_comm.interval = SEND_INTERVAL_S
        log.info("dask pilots: scheduler at %s (pid %d)", self.scheduler_address, self.proc.pid)

    def release_later(self, fut: Any) -> None:
        """Release a finished task's key after the next submit (or ``RELEASE_DELAY_S``).

        A release sent first would open the scheduler's 5 ms batching window to the worker, and the
        next task's ``compute-task`` message would wait it out; sent after, it waits instead.
        """
        self._to_release.append(fut)
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(RELEASE_DELAY_S, self._flush_releases)

    def _flush_releases(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        futs, self._to_release = self._to_release, []
        for fut in futs:
            with contextlib.suppress(Exception):
                fut.release()

    async def launch(self, alloc: Allocation) -> str:
        """``sbatch`` one dask-jobqueue job script for the allocation."""
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        job = _job_class()(
            nodes=self.s.nodes_per_allocation, **job_kwargs(self.s, self.scheduler_address, alloc.name, log_dir)
        )
        (self.workdir / f"{alloc.name}.sh").write_text(job.job_script())
        try:
            await job.start()
        except Exception as exc:
            raise EngineError(f"sbatch failed: {exc}") from exc
        self.jobs[alloc.name] = job
        return str(job.job_id)

    async def cancel(self, alloc: Allocation) -> None:
        """Forget the allocation's job; the manager cancels it by id (its workers end with it)."""
        self.jobs.pop(alloc.name, None)

    async def workers(self) -> dict[str, list[WorkerInfo]]:
        """Workers connected to the scheduler, by allocation (sent again only when they changed)."""
        reply = await self.client.scheduler.rx_workers(since=self._workers_version)
        if "workers" in reply:
            out: dict[str, list[WorkerInfo]] = {}
            for addr, name, host, nthreads, gpus in reply["workers"]:
                alloc = allocation_of(name)
                if alloc is not None:
                    out.setdefault(alloc, []).append(
                        WorkerInfo(name=name, node=host, slots=int(nthreads), gpus=int(gpus), incarnation=addr)
                    )
            self._workers = out
            self._workers_version = int(reply["version"])
        return {k: list(v) for k, v in self._workers.items()}

    async def run(self, spec: RunSpec, placement: Placement, token: str = "") -> RemoteTask:
        """Submit to exactly the worker the manager chose (queued there behind its task if it is busy)."""
        gpus = list(placement.gpu_indices)
        fut = self.client.submit(
            run_pilot_task,
            spec.to_json(),
            gpus,
            f"{placement.allocation}/{placement.worker}",
            placement.start_by if token else None,
            token,
            key=f"rx-{spec.task_id}-{spec.attempt}-{uuid.uuid4().hex[:6]}",
            pure=False,
            workers=[placement.worker],
            allow_other_workers=False,
            resources={"GPU": len(gpus)} if gpus else None,
        )
        self._flush_releases()
        return _DaskTask(fut, spec.result_path, self)

    async def close(self) -> None:
        """Close the client and stop the scheduler."""
        self._flush_releases()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 10)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
