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

Prefetch: when every slot is busy, one more attempt per slot is queued at a
busy worker (``PREFETCH_PER_SLOT``), so that the worker starts it the moment
its task ends instead of idling for the round trip to the agent and back (on
trivial tasks that round trip, not the agent's CPU, bounded throughput). A
queued attempt is not *running*: it holds no slot and its timeout does not
run until the manager's start signal (a task of its worker ended, so the
worker took it up). Taken back before it starts (its worker lost, its
allocation released, a slot free elsewhere), it is placed again. Whether it
started or was taken back is settled by a claim file that only one side can
create; the worker never starts a dispatch that was taken back, cancelled,
or that would start too late for the allocation's wall time (see
``pilot_worker``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import uuid
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
from reflexarc.hpc_bridge.engines.pilot_worker import cancel_marker, claim
from reflexarc.hpc_bridge.engines.slurm_queue import SlurmQueue
from reflexarc.hpc_bridge.site_config import PilotSettings
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec

log = logging.getLogger(__name__)

#: Attempts queued at each busy worker slot, ready to start when it frees.
PREFETCH_PER_SLOT = 1


class TakenBack(Exception):
    """The attempt was taken back from its worker before it started (it is placed again)."""


class RemoteTask(abc.ABC):
    """One attempt handed to a backend."""

    @abc.abstractmethod
    async def result(self) -> dict[str, Any]:
        """The worker's outcome record; raises if the worker died or the task was cancelled."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Forget the attempt on the engine's side (the worker is stopped by the cancel marker)."""

    @abc.abstractmethod
    def abandon(self) -> None:
        """A queued attempt will not run here: make :meth:`result` raise :class:`TakenBack` now.

        The worker is kept from starting it by a marker file (see ``pilot_worker``).
        """


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
    async def run(self, spec: RunSpec, placement: Placement, token: str = "") -> RemoteTask:
        """Dispatch the attempt to the placement's worker.

        A queued placement comes with ``token``: the worker checks it may still start it
        (``run_pilot_task(..., start_by, token)``).
        """

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
    return Need(
        key=key, slots_per_node=min(ranks, rpn) * per_rank, nodes=nodes, gpus=spec.gpus, timeout_s=spec.timeout_s
    )


class PilotEngine(Engine):
    """An engine whose tasks run in allocations an :class:`AllocationManager` holds."""

    reattachable = False

    def __init__(
        self,
        backend_cls: type[PilotBackend],
        settings: PilotSettings,
        workdir_root: str,
        field: str,
        label: str | None = None,
    ) -> None:
        self.settings = settings
        self.field = field
        self.state_dir = Path(workdir_root).parent
        self.label = label or self.state_dir.name
        self.backend_cls = backend_cls
        self.name = backend_cls.kind
        self.backend: PilotBackend | None = None
        self.manager: AllocationManager | None = None
        self.queue = SlurmQueue(settings.env)
        # One allocation's worth of tasks waiting in the engine (beyond those queued at busy workers)
        # shows the manager the backlog.
        self.prefetch = settings.slots_per_allocation * (1 + PREFETCH_PER_SLOT)
        #: Attempts dispatched to a worker and not ended, by placement key (for the manager's signals).
        self.dispatched: dict[str, PilotExecution] = {}

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
        manager = AllocationManager(
            self.settings,
            backend,
            self.queue,
            self.state_dir,
            kind=self.name,
            label=self.label,
            field=self.field,
            prefetch_per_slot=PREFETCH_PER_SLOT,
        )
        manager.on_start = self._started
        manager.on_take_back = self._taken_back
        backend.manager = manager
        await backend.start()
        self.backend, self.manager = backend, manager
        try:
            await manager.start()
        except BaseException:
            await backend.close()
            raise
        log.info(
            "%s pilots: workers connect to %s; %d to %d allocation(s) of %d node(s) x %d slot(s), walltime %s",
            self.name,
            address,
            self.settings.min_allocations,
            self.settings.max_allocations,
            self.settings.nodes_per_allocation,
            self.settings.slots_per_node,
            self.settings.walltime,
        )

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

    def _started(self, placement: Placement) -> None:
        ex = self.dispatched.get(placement.key)
        if ex is not None:
            ex.placement = placement
            ex.started = True

    def _taken_back(self, placement: Placement) -> bool:
        ex = self.dispatched.get(placement.key)
        return ex.take_back() if ex is not None else True

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
    """One attempt on a pilot: waiting for a slot, queued at a busy worker, then running on one worker."""

    def __init__(self, engine: PilotEngine, spec: RunSpec, need: Need) -> None:
        self.engine = engine
        self.spec = spec
        self.need = need
        self.native_id = f"{engine.name}-pilot:{need.key}"
        self.placement: Placement | None = None
        self.remote: RemoteTask | None = None
        #: The worker really runs it (not merely queued there).
        self.started = False
        #: The allocation, its scheduler job id, and the worker the attempt ran on.
        self.allocation: str | None = None
        self.job_id: str | None = None
        self.worker: str | None = None
        self._cancelled = False
        self._taken_back = False
        self._token = ""

    @property
    def running(self) -> bool:
        return self.remote is not None and self.started

    def note(self) -> str | None:
        if self.remote is None and self.engine.manager is not None:
            return self.engine.manager.waiting_reason(self.need.key)
        if self.remote is not None and not self.started:
            return (
                f"queued at worker {self.worker} of allocation {self.allocation} (job {self.job_id}), behind its task"
            )
        return None

    async def dispatch(self, placement: Placement) -> None:
        """Start the attempt where the manager placed it (queued there if its worker is busy)."""
        backend = self.engine.backend
        assert backend is not None
        self.placement = placement
        self.started = not placement.queued
        self._taken_back = False
        self.allocation, self.job_id, self.worker = placement.allocation, placement.job_id, placement.worker
        self.machine = f"{placement.allocation}/{placement.worker}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cancel_marker(self.spec.workdir))  # a stale marker would stop it at once
        self._token = uuid.uuid4().hex[:12] if placement.queued else ""
        self.engine.dispatched[placement.key] = self
        try:
            self.remote = await backend.run(self.spec, placement, self._token)
        except BaseException:
            self._release(worker_lost=False)
            raise

    def take_back(self) -> bool:
        """Take the queued attempt back from its worker to place it again; ``False`` if the worker started it."""
        if self.remote is None:
            return True
        if self.started or not self._claim():
            self.started = True
            return False
        self._taken_back = True
        self.placement = None  # the manager dropped it already
        self.engine.dispatched.pop(self.need.key, None)
        self.remote.abandon()
        return True

    def _claim(self) -> bool:
        """Claim the queued dispatch for the agent (the worker then never starts it); ``False``: it started."""
        # A small file create on the event loop, on the rare paths (take-back, cancel, a lost worker), and
        # before anything else: its result decides what happens next.
        try:
            return claim(self.spec.workdir, self._token, "taken back")
        except OSError as exc:
            log.warning(
                "%s: cannot write the claim file in %s: %s; taking it as started", self.need.key, self.spec.workdir, exc
            )
            return False

    def _release(self, worker_lost: bool) -> None:
        self.engine.dispatched.pop(self.need.key, None)
        if self.placement is not None and self.engine.manager is not None:
            backend = self.engine.backend
            replaced = worker_lost and backend is not None and backend.replaces_worker_on_cancel
            self.engine.manager.release(self.placement, worker_lost=replaced)
            self.placement = None

    def _again(self) -> None:
        """Back to waiting for a slot: the dispatch did not start."""
        self.remote = None
        self.started = False
        self._taken_back = False
        self._token = ""

    async def wait(self) -> Outcome:
        manager = self.engine.manager
        assert manager is not None
        while True:
            if self.remote is None:
                try:
                    placement = await manager.place(self.need)
                except asyncio.CancelledError:
                    if self._cancelled:
                        return Outcome(
                            JobStatus.CANCELLED, error="cancelled while waiting for a pilot slot", retryable=False
                        )
                    raise
                if self._cancelled:
                    manager.release(placement)
                    return Outcome(
                        JobStatus.CANCELLED, error="cancelled while waiting for a pilot slot", retryable=False
                    )
                try:
                    await self.dispatch(placement)
                except EngineError as exc:
                    return Outcome(JobStatus.FAILED, error=str(exc))
            assert self.remote is not None
            try:
                data = await self.remote.result()
            except asyncio.CancelledError:
                if self._cancelled:
                    self._release(worker_lost=self.started)
                    return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
                self._release(worker_lost=False)
                raise
            except Exception as exc:
                if self._cancelled:
                    self._release(worker_lost=self.started)
                    return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
                if self._taken_back:
                    self._again()
                    continue
                if not self.started and self._claim():
                    # Its worker died (or left) before it reached it: it never started. Place it again.
                    log.info("%s: the worker %s died before it started; placing it again", self.need.key, self.worker)
                    self._release(worker_lost=False)
                    self._again()
                    continue
                self._release(worker_lost=True)
                return Outcome(
                    JobStatus.FAILED,
                    machine=self.machine,
                    error=f"the {self.engine.name} worker {self.worker} of allocation {self.allocation} "
                    f"(job {self.job_id}) died or left while running it: {type(exc).__name__}: {exc}",
                )
            if data.get("not_started"):
                self._release(worker_lost=False)
                if self._cancelled:
                    return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False, machine=self.machine)
                log.info("%s: not started on %s: %s; placing it again", self.need.key, self.machine, data.get("error"))
                self._again()
                continue
            self._release(worker_lost=False)
            return dataclasses.replace(outcome_from_worker(data), machine=self.machine)

    async def cancel(self) -> None:
        self._cancelled = True
        manager = self.engine.manager
        if self.remote is None:
            # Still waiting for a slot: wait() sees the flag.
            if manager is not None:
                manager.withdraw(self.need.key)
            return
        if not self.started and await asyncio.to_thread(self._claim):
            self.remote.abandon()  # it will never start: wait() returns cancelled now
            return
        self.started = True
        backend = self.engine.backend
        if (
            manager is not None
            and backend is not None
            and backend.replaces_worker_on_cancel
            and self.placement is not None
        ):
            # The marker kills the worker process, and with it the attempts queued there: hand them back
            # first, and queue nothing more at it.
            manager.lose_worker(self.placement)
        # The watchdog in the worker kills the task (and its worker process) on this marker.
        marker = cancel_marker(self.spec.workdir)
        await asyncio.to_thread(Path(marker).write_text, "cancelled by the site agent\n")
        await self.remote.cancel()
