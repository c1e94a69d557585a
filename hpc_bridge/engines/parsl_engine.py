"""Parsl pilots: one HighThroughputExecutor (with ``SlurmProvider`` + ``SrunLauncher``) per allocation.

Why one executor per allocation, and blocks driven by the manager rather
than Parsl's own elasticity: an HTEX interchange hands a task to whichever
connected worker pool has a free worker; it cannot be told "not on the block
with 90 s left". With one interchange per allocation, choosing the executor
*is* choosing the allocation, so the rule "no task starts on an allocation
whose wall time left cannot hold its timeout" holds by construction, and the
manager's idle/drain/replace decisions apply to exactly one Slurm job.
Parsl's strategy is therefore not used: each executor gets exactly one block
(``init_blocks=0``, ``max_blocks=1``, ``scale_out_facade(1)``), and the
manager cancels the job by id.

Each executor's interchange is a child of the agent that dies with it
(``PR_SET_PDEATHSIG``); its workers listen for it on a port in
``worker_port_range`` and exit when its heartbeats stop. All Parsl calls that
block (starting an interchange, ``sbatch``, asking for connected managers)
run on one thread of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from reflexarc.hpc_bridge.allocations import Allocation, Placement, WorkerInfo
from reflexarc.hpc_bridge.engines.base import EngineError
from reflexarc.hpc_bridge.engines.pilot import PREFETCH_PER_SLOT, PilotBackend, RemoteTask, TakenBack
from reflexarc.hpc_bridge.engines.pilot_worker import run_pilot_task
from reflexarc.hpc_bridge.site_config import ParslEngineSettings
from reflexarc.hpc_bridge.worker import RunSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

# The interchange must not outlive the agent (a SIGKILLed agent would leave it running).
_INTERCHANGE = (
    "from reflexarc.process import die_with_parent; die_with_parent(); import runpy; "
    "runpy.run_module('parsl.executors.high_throughput.interchange', run_name='__main__')"
)


def _memory_gb(text: str | None) -> int | None:
    if not text:
        return None
    from dask.utils import parse_bytes

    return max(1, math.ceil(parse_bytes(text) / 2**30))


def make_executor(s: ParslEngineSettings, address: str, name: str, workdir: Path) -> Any:
    """A HighThroughputExecutor for one allocation named ``name`` (not started)."""
    from parsl.executors import HighThroughputExecutor
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
    from parsl.launchers import SingleNodeLauncher, SrunLauncher
    from parsl.providers import SlurmProvider

    python = s.python or sys.executable
    options = "\n".join(f"#SBATCH {d}" for d in s.job_directives)
    provider = SlurmProvider(
        partition=s.partition,
        account=s.account,
        nodes_per_block=s.nodes_per_allocation,
        cores_per_node=s.cores_per_node,
        mem_per_node=_memory_gb(s.memory_per_node),
        gres=f"gpu:{s.gpus_per_node}" if s.gpus_per_node else None,
        init_blocks=0,
        min_blocks=0,
        max_blocks=1,
        walltime=s.walltime,
        scheduler_options=options,
        worker_init="\n".join([*s.worker_init, f"export PATH={Path(python).parent}:$PATH"]),
        exclusive=False,
        cmd_timeout=30,
        launcher=SrunLauncher(debug=False) if s.launcher == "srun" else SingleNodeLauncher(debug=False),
    )
    htex = HighThroughputExecutor(
        label=name,
        provider=provider,
        address=address,
        worker_port_range=s.worker_port_range,
        cores_per_worker=s.cores_per_worker,
        max_workers_per_node=s.slots_per_node,
        # The tasks the manager queues at a busy pool wait in the pool, not in the interchange.
        prefetch_capacity=PREFETCH_PER_SLOT * s.slots_per_node,
        heartbeat_period=s.heartbeat_s,
        heartbeat_threshold=max(3 * s.heartbeat_s, 30),
        poll_period=10,
        launch_cmd=DEFAULT_LAUNCH_CMD.replace(
            "process_worker_pool.py", f"{python} -m parsl.executors.high_throughput.process_worker_pool", 1
        ),
        interchange_launch_cmd=[sys.executable, "-c", _INTERCHANGE],
        worker_logdir_root=str(workdir / "logs"),
        block_error_handler=False,
    )
    htex.run_dir = str(workdir / "run")
    htex.run_id = name
    provider.script_dir = str(workdir / "submit")
    os.makedirs(provider.script_dir, exist_ok=True)
    return htex


class _ParslTask(RemoteTask):
    def __init__(self, fut: Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Any] = loop.create_future()

        # Not asyncio.wrap_future: cancelling that would cancel Parsl's own future, and Parsl's
        # result thread fails when it later sets the result of a cancelled future.
        def relay(f: Future[Any]) -> None:
            loop.call_soon_threadsafe(self._settle, f)

        fut.add_done_callback(relay)

    def _settle(self, f: Future[Any]) -> None:
        if self.done.done():
            return
        exc = f.exception()
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(f.result())

    async def result(self) -> dict[str, Any]:
        data: dict[str, Any] = await asyncio.shield(self.done)
        return data

    async def cancel(self) -> None:
        # The worker process is killed by the cancel marker; Parsl reports it lost.
        return None

    def abandon(self) -> None:
        # HTEX cannot take a task back from its interchange or worker pool: the agent's claim file keeps
        # the worker from starting it (see pilot_worker.claim); result() ends now.
        if not self.done.done():
            self.done.set_exception(TakenBack("taken back"))


class ParslBackend(PilotBackend):
    """One HTEX per allocation; the manager chooses the executor, the interchange the worker."""

    kind = "parsl"
    # A killed Parsl worker is restarted by its pool; the pool (the "worker" we place on) stays usable.
    replaces_worker_on_cancel = False

    def __init__(self, settings: ParslEngineSettings, address: str, workdir: Path) -> None:
        super().__init__(settings, address, workdir)
        self.s = settings
        self.executors: dict[str, Any] = {}
        # One long-lived thread: Parsl's blocking calls, and the thread the interchanges die with.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rx-parsl")

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def start(self) -> None:
        """Check that Parsl is installed."""
        try:
            import parsl  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"engine.kind parsl needs the 'parsl' package: {exc}") from exc

    def _launch(self, alloc: Allocation) -> tuple[Any, str]:
        workdir = self.workdir / alloc.name
        htex = make_executor(self.s, self.address, alloc.name, workdir)
        htex.start()
        try:
            blocks = htex.scale_out_facade(1)
            if not blocks:
                status = next(iter(htex.status_facade.values()), None)
                raise EngineError(f"sbatch failed: {getattr(status, 'message', None) or 'no job id'}")
            return htex, str(htex.blocks_to_job_id[blocks[0]])
        except BaseException:
            htex.shutdown()
            raise

    async def launch(self, alloc: Allocation) -> str:
        """Start the allocation's interchange, then ``sbatch`` its one block."""
        htex, job_id = await self._call(self._launch, alloc)
        self.executors[alloc.name] = htex
        return str(job_id)

    async def cancel(self, alloc: Allocation) -> None:
        """Stop the allocation's interchange (the manager cancels its job by id)."""
        htex = self.executors.pop(alloc.name, None)
        if htex is not None:
            with contextlib.suppress(Exception):
                await self._call(partial(htex.shutdown, timeout=5.0))

    def _managers(self) -> dict[str, list[WorkerInfo]]:
        out: dict[str, list[WorkerInfo]] = {}
        for name, htex in list(self.executors.items()):
            try:
                managers = htex.command_client.run("MANAGERS", timeout_s=5)
            except Exception as exc:
                log.warning("parsl pilots: interchange of %s does not answer: %s", name, exc)
                continue
            out[name] = [
                WorkerInfo(
                    name=m["manager"],
                    node=m["manager"],
                    slots=int(m["worker_count"]),
                    gpus=self.s.gpus_per_node,
                    incarnation=m["manager"],
                )
                for m in managers
                if m.get("active") and not m.get("draining")
            ]
        return out

    async def workers(self) -> dict[str, list[WorkerInfo]]:
        """Worker pools connected to each allocation's interchange."""
        if not self.executors:
            return {}
        result: dict[str, list[WorkerInfo]] = await self._call(self._managers)
        return result

    async def run(self, spec: RunSpec, placement: Placement, token: str = "") -> RemoteTask:
        """Submit to the interchange of the allocation the manager chose (queued at its pool if busy)."""
        htex = self.executors.get(placement.allocation)
        if htex is None:
            raise EngineError(f"allocation {placement.allocation} has no Parsl executor any more")
        fut = htex.submit(
            run_pilot_task,
            {},
            spec.to_json(),
            list(placement.gpu_indices),
            f"{placement.allocation}/{placement.worker}",
            placement.start_by if token else None,
            token,
        )
        return _ParslTask(fut)

    async def close(self) -> None:
        """Stop every interchange, then the thread."""
        for name in list(self.executors):
            htex = self.executors.pop(name)
            with contextlib.suppress(Exception):
                await self._call(partial(htex.shutdown, timeout=5.0))
        self._pool.shutdown(wait=True)
