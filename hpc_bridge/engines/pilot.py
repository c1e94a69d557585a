"""Pilot engines: tasks run on workers of allocations the site holds (dask-jobqueue, Parsl HTEX).

:class:`PilotEngine` is the :class:`~reflexarc.hpc_bridge.engines.base.Engine`
the agent sees. It asks the :class:`~reflexarc.hpc_bridge.allocations.AllocationManager`
for a place for each attempt (a worker of an allocation whose wall time
left holds the task's timeout, with the task's cores, MPI ranks and GPUs
reserved), then hands the attempt to its :class:`PilotBackend`, which
dispatches it to exactly that worker (Dask) or that allocation's interchange
(Parsl).

``submit`` returns at once. When a slot is free the attempt is already
running (warm start: milliseconds); otherwise the execution waits for one
while the manager grows the allocations, and ``note()`` says why it waits.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

from reflexarc.hpc_bridge.allocations import (
    Allocation,
    AllocationManager,
    Need,
    Placement,
    WorkerInfo,
)
from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.engines.network import resolve_address
from reflexarc.hpc_bridge.engines.pilot_worker import cancel_marker
from reflexarc.hpc_bridge.engines.slurm_queue import SlurmQueue
from reflexarc.hpc_bridge.site_config import PilotSettings
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec

log = logging.getLogger(__name__)


class RemoteTask(abc.ABC):
    """One attempt handed to a backend."""

    @abc.abstractmethod
    async def result(self) -> dict[str, Any]:
        """The worker's outcome record; raises if the worker died or the task was cancelled."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Forget the attempt on the engine's side (the worker is stopped by the cancel marker)."""


class PilotBackend(abc.ABC):
    """An engine holding allocations: launches them, lists their workers, runs an attempt on one."""

    kind: str = "pilot"
    #: Whether a cancelled attempt's worker process is replaced (its slot is unusable until then).
    replaces_worker_on_cancel: bool = True

    def __init__(self, settings: PilotSettings, address: str, workdir: Path) -> None:
        self.settings = settings
        self.address = address
        self.workdir = workdir
        self.manager: AllocationManager | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start the scheduler (Dask) or prepare executors (Parsl)."""

    @abc.abstractmethod
    async def launch(self, alloc: Allocation) -> str:
        """Submit the allocation; return its scheduler job id."""

    @abc.abstractmethod
    async def cancel(self, alloc: Allocation) -> None:
        """Drop what the engine holds for the allocation (the manager scancels the job)."""

    @abc.abstractmethod
    async def workers(self) -> dict[str, list[WorkerInfo]]:
        """Connected workers by allocation name."""

    @abc.abstractmethod
    async def run(self, spec: RunSpec, placement: Placement) -> RemoteTask:
        """Dispatch the attempt to the placement's worker."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop the scheduler / interchanges."""


def need_of(spec: RunSpec, settings: PilotSettings, key: str) -> Need:
    """What the attempt needs: slots (cores / cores per slot) per node, nodes for MPI ranks, GPUs, timeout."""
    slot_cores = settings.cores_per_node / settings.slots_per_node
    per_rank = max(1, math.ceil(spec.cpus / slot_cores))
    ranks = max(1, spec.ranks)
    if ranks == 1:
        return Need(key=key, slots_per_node=per_rank, nodes=1, gpus=spec.gpus, timeout_s=spec.timeout_s)
    fit = max(1, settings.slots_per_node // per_rank)
    rpn = spec.ranks_per_node or min(ranks, fit)
    nodes = math.ceil(ranks / rpn)
    return Need(key=key, slots_per_node=min(ranks, rpn) * per_rank, nodes=nodes, gpus=spec.gpus,
                timeout_s=spec.timeout_s)


class PilotEngine(Engine):
    """An engine whose tasks run in allocations an :class:`AllocationManager` holds."""

    reattachable = False

    def __init__(self, backend_cls: type[PilotBackend], settings: PilotSettings, workdir_root: str,
                 field: str, label: str | None = None) -> None:
        self.settings = settings
        self.field = field
        self.state_dir = Path(workdir_root).parent
        self.label = label or self.state_dir.name
        self.backend_cls = backend_cls
        self.name = backend_cls.kind
        self.backend: PilotBackend | None = None
        self.manager: AllocationManager | None = None
        self.queue = SlurmQueue(settings.env)
        # One allocation's worth of tasks waiting in the engine shows the manager the backlog.
        self.prefetch = settings.slots_per_allocation

    @property
    def capacity(self) -> int:
        """Every slot of every allocation the site may hold."""
        return self.settings.max_allocations * self.settings.slots_per_allocation

    async def preflight(self) -> str:
        """Check the settings against this host and the scheduler; return the address workers use.

        Raises :class:`EngineError` naming the field: an address that is not this
        host's, a wall time longer than the partition's ``MaxTime``.
        """
        address = resolve_address(self.settings.address, self.settings.interface, self.field)
        partition, max_time = await self.queue.partition_max_time(self.settings.partition)
        if max_time is not None and self.settings.walltime_s > max_time:
            raise EngineError(
                f"{self.field}.walltime: {self.settings.walltime} is longer than partition {partition}'s "
                f"MaxTime ({max_time / 3600:g} h); Slurm would refuse every allocation"
            )
        return address

    async def start(self) -> None:
        """Check the settings, start the backend, cancel leftovers, keep ``min_allocations``."""
        os.environ.update(self.settings.env)  # the engines' own sbatch calls read SLURM_CONF from here
        address = await self.preflight()
        workdir = self.state_dir / "pilots" / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        backend = self.backend_cls(self.settings, address, workdir)
        manager = AllocationManager(self.settings, backend, self.queue, self.state_dir, kind=self.name,
                                    label=self.label, field=self.field)
        backend.manager = manager
        await backend.start()
        self.backend, self.manager = backend, manager
        try:
            await manager.start()
        except BaseException:
            await backend.close()
            raise
        log.info("%s pilots: workers connect to %s; %d to %d allocation(s) of %d node(s) x %d slot(s), walltime %s",
                 self.name, address, self.settings.min_allocations, self.settings.max_allocations,
                 self.settings.nodes_per_allocation, self.settings.slots_per_node, self.settings.walltime)

    async def submit(self, spec: RunSpec) -> Execution:
        """Place the attempt (now if a slot is free, else when one is) and run it there."""
        assert self.manager is not None, "start() first"
        need = need_of(spec, self.settings, f"{spec.task_id}#{spec.attempt}")
        why = self.manager.never_fits(need)
        if why is not None:
            return _Refused(f"cannot run on the {self.name} pilots: {why}")
        ex = PilotExecution(self, spec, need)
        placement = self.manager.try_place(need)
        if placement is not None:
            await ex.dispatch(placement)
        return ex

    async def close(self) -> None:
        """Cancel every allocation and stop the backend."""
        if self.manager is not None:
            await self.manager.close()
        if self.backend is not None:
            await self.backend.close()

    def status(self) -> dict[str, Any]:
        """The allocations, as ``site status`` shows them."""
        return self.manager.snapshot() if self.manager is not None else {}


class _Refused(Execution):
    """An attempt no allocation can hold: it fails at once, without a retry."""

    def __init__(self, why: str) -> None:
        self.why = why
        self.native_id = None

    async def wait(self) -> Outcome:
        return Outcome(JobStatus.FAILED, error=self.why, retryable=False)

    async def cancel(self) -> None:
        return None


class PilotExecution(Execution):
    """One attempt on a pilot: waiting for a slot, then running on one worker."""

    def __init__(self, engine: PilotEngine, spec: RunSpec, need: Need) -> None:
        self.engine = engine
        self.spec = spec
        self.need = need
        self.native_id = f"{engine.name}-pilot:{need.key}"
        self.placement: Placement | None = None
        self.remote: RemoteTask | None = None
        #: The allocation, its scheduler job id, and the worker the attempt ran on.
        self.allocation: str | None = None
        self.job_id: str | None = None
        self.worker: str | None = None
        self._cancelled = False

    @property
    def running(self) -> bool:
        return self.remote is not None

    def note(self) -> str | None:
        if self.remote is None and self.engine.manager is not None:
            return self.engine.manager.waiting_reason(self.need.key)
        return None

    async def dispatch(self, placement: Placement) -> None:
        """Start the attempt where the manager placed it."""
        backend = self.engine.backend
        assert backend is not None
        self.placement = placement
        self.allocation, self.job_id, self.worker = placement.allocation, placement.job_id, placement.worker
        self.machine = f"{placement.allocation}/{placement.worker}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cancel_marker(self.spec.workdir))  # a stale marker would stop it at once
        try:
            self.remote = await backend.run(self.spec, placement)
        except BaseException:
            self._release(worker_lost=False)
            raise

    def _release(self, worker_lost: bool) -> None:
        if self.placement is not None and self.engine.manager is not None:
            backend = self.engine.backend
            replaced = worker_lost and backend is not None and backend.replaces_worker_on_cancel
            self.engine.manager.release(self.placement, worker_lost=replaced)
            self.placement = None

    async def wait(self) -> Outcome:
        manager = self.engine.manager
        assert manager is not None
        if self.remote is None:
            try:
                placement = await manager.place(self.need)
            except asyncio.CancelledError:
                if self._cancelled:
                    return Outcome(JobStatus.CANCELLED, error="cancelled while waiting for a pilot slot",
                                   retryable=False)
                raise
            if self._cancelled:
                manager.release(placement)
                return Outcome(JobStatus.CANCELLED, error="cancelled while waiting for a pilot slot",
                               retryable=False)
            try:
                await self.dispatch(placement)
            except EngineError as exc:
                return Outcome(JobStatus.FAILED, error=str(exc))
        assert self.remote is not None
        lost = False
        try:
            data = await self.remote.result()
        except asyncio.CancelledError:
            if self._cancelled:
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
            raise
        except Exception as exc:
            lost = True
            if self._cancelled:
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
            return Outcome(JobStatus.FAILED, machine=self.machine,
                           error=f"the {self.engine.name} worker {self.worker} of allocation {self.allocation} "
                                 f"(job {self.job_id}) died or left while running it: {type(exc).__name__}: {exc}")
        finally:
            self._release(worker_lost=lost or self._cancelled)
        return dataclasses.replace(outcome_from_worker(data), machine=self.machine)

    async def cancel(self) -> None:
        self._cancelled = True
        if self.remote is None:
            # Still waiting for a slot: wait() sees the flag.
            if self.engine.manager is not None:
                self.engine.manager.withdraw(self.need.key)
            return
        # The watchdog in the worker kills the task (and its worker process) on this marker.
        marker = cancel_marker(self.spec.workdir)
        await asyncio.to_thread(Path(marker).write_text, "cancelled by the site agent\n")
        await self.remote.cancel()
