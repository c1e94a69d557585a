"""The elastic, wall-time-aware allocation manager of pilot engines.

A pilot engine (dask-jobqueue, Parsl HTEX) holds *allocations*: batch jobs
whose workers run the site's tasks. This module decides, with a reason logged
for every decision, when to ask for one, where each task starts, and when to
let one go::

    queued ──(workers connect)──▶ running ──(little wall time left)──▶ draining
       │                             │                                   │
       └──(idle, cancelled, ended)───┴──────────(idle / drained)─────────┴──▶ released

Rules:

* **Backlog decides.** When the tasks waiting for a slot need more slots than
  the allocations already queued will bring, another allocation is asked for,
  up to ``max_allocations`` ("backlog 37 tasks (37 slots) > 8 free slots:
  requesting allocation 3 of 4"); at least ``min_allocations`` are kept.
* **Wall time.** A task starts only on an allocation whose wall time left (as
  the scheduler reports it) is at least the task's timeout plus
  ``walltime_margin_s``. Among those, the one ending soonest is used, so that
  younger allocations keep room for long tasks. A task no running allocation
  can hold waits for a new one; when the site is at ``max_allocations`` the
  allocation with the least time left is drained to make room.
* **Draining.** An allocation with less than ``drain_s`` left takes no new
  task; it is released once its tasks end, and a replacement is asked for
  while work remains (draining allocations do not count against the maximum).
* **Idle.** An allocation with no task for ``idle_timeout_s`` is released
  (cancelled by job id), down to ``min_allocations``.
* **Prefetch.** With ``prefetch_per_slot`` (the pilot engines use 1), a
  one-slot task with a timeout may also be *queued* on a busy worker, behind
  the tasks running there, so that the worker starts it the moment a slot
  frees instead of idling for a round trip to the agent. It is queued only
  where the allocation's wall time holds the longest remaining timeout of the
  tasks ahead plus its own (the worker checks again when it really starts:
  ``Placement.start_by``). It *starts* when a task of its worker ends
  (``on_start``): only then does it hold a slot, count as running and its
  timeout start. A queued task is handed back (``on_take_back``) to be placed
  again when its worker is lost or its allocation released: it never started.
* **Crash safety.** Every allocation is recorded (``allocations.json`` under
  the site's state directory) before and after it is submitted, and jobs are
  named with a prefix unique to the site's state directory. On start, jobs a
  previous agent process left (recorded, or found by name) are cancelled by
  job id: no Slurm job is orphaned.

The manager is engine-agnostic: an :class:`AllocationBackend` launches and
cancels allocations and lists connected workers; a :class:`QueueView` says
what the scheduler thinks (``SlurmQueue``). Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Gauge

from reflexarc.hpc_bridge.site_config import PilotSettings
from reflexarc.hpc_bridge.worker import write_outcome

log = logging.getLogger(__name__)

ALLOCATIONS = Gauge("rx_site_allocations", "Pilot allocations by state", ["site", "state"])
FREE_SLOTS = Gauge("rx_site_allocation_free_slots", "Free task slots in running pilot allocations", ["site"])
WAITING = Gauge("rx_site_pilot_waiting_tasks", "Tasks waiting for a pilot slot", ["site"])

#: Released allocations kept in the status file.
KEEP_RELEASED = 20


class AllocationState(StrEnum):
    """Where an allocation stands."""

    QUEUED = "queued"
    RUNNING = "running"
    DRAINING = "draining"
    RELEASED = "released"


@dataclass(frozen=True)
class WorkerInfo:
    """One connected worker of an allocation (a Dask worker process, a Parsl worker pool)."""

    name: str
    node: str
    slots: int
    gpus: int = 0
    #: Changes when the worker process is replaced (e.g. its address).
    incarnation: str = ""


@dataclass(frozen=True)
class Need:
    """What one task attempt needs from an allocation."""

    key: str
    slots_per_node: int = 1
    nodes: int = 1
    gpus: int = 0
    timeout_s: float | None = None

    @property
    def slots(self) -> int:
        """Slots over all its nodes."""
        return self.slots_per_node * self.nodes


@dataclass(frozen=True)
class Placement:
    """Where one task attempt runs: an allocation, a worker on its first node, reserved slots and GPUs."""

    key: str
    allocation: str
    job_id: str
    worker: str
    node: str
    slots: tuple[tuple[str, int], ...]
    gpu_indices: tuple[int, ...] = ()
    #: The attempt's timeout (seconds), and when it started (manager clock; queued: when it was queued).
    timeout_s: float | None = None
    since: float = 0.0
    #: Queued on a busy worker behind the tasks running there (prefetched); it holds no slot yet.
    queued: bool = False
    #: Latest time (epoch seconds) at which the worker may start it: later, the allocation could not hold it.
    start_by: float | None = None


@dataclass
class Allocation:
    """One allocation (batch job) and what runs in it."""

    name: str
    number: int
    nodes: int
    requested_at: float
    state: AllocationState = AllocationState.QUEUED
    job_id: str | None = None
    started_at: float | None = None
    end_at: float | None = None
    node_list: str = ""
    pending_reason: str = ""
    reason: str = ""
    released_at: float | None = None
    slurm_running_at: float | None = None
    idle_since: float | None = None
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    #: Prefetched attempts, queued at a busy worker (in the order they were queued).
    queued: dict[str, Placement] = field(default_factory=dict)
    #: worker name -> incarnation that must go away before the worker takes a task again
    quarantine: dict[str, str] = field(default_factory=dict)

    def remaining(self, now: float) -> float | None:
        """Seconds of wall time left (``None`` until the scheduler said)."""
        return None if self.end_at is None else self.end_at - now

    def worker_load(self) -> dict[str, int]:
        """Tasks of ours running on each worker."""
        load: dict[str, int] = {}
        for p in self.placements.values():
            load[p.worker] = load.get(p.worker, 0) + 1
        return load

    def node_capacity(self) -> dict[str, tuple[int, int]]:
        """node -> (free slots, free GPUs)."""
        total: dict[str, list[int]] = {}
        for w in self.workers.values():
            t = total.setdefault(w.node, [0, 0])
            t[0] += w.slots
            t[1] = max(t[1], w.gpus)  # every worker of a node reports the node's GPUs
        for p in self.placements.values():
            for node, n in p.slots:
                if node in total:
                    total[node][0] -= n
            if p.gpu_indices and p.node in total:
                total[p.node][1] -= len(p.gpu_indices)
        return {node: (s, g) for node, (s, g) in total.items()}

    def fit(self, need: Need) -> Placement | None:
        """Reserve room for ``need`` in this allocation, if there is room now."""
        capacity = self.node_capacity()
        load = self.worker_load()
        idle: dict[str, list[WorkerInfo]] = {}  # workers with a free thread/process, by node
        for w in self.workers.values():
            if load.get(w.name, 0) < w.slots and self.quarantine.get(w.name) != w.incarnation:
                idle.setdefault(w.node, []).append(w)
        first = [n for n, (s, g) in capacity.items() if s >= need.slots_per_node and g >= need.gpus and idle.get(n)]
        if not first:
            return None
        lead = first[0]
        others = [n for n, (s, _g) in capacity.items() if n != lead and s >= need.slots_per_node]
        if len(others) < need.nodes - 1:
            return None
        used_gpus = {i for p in self.placements.values() if p.node == lead for i in p.gpu_indices}
        gpus_on_lead = max(w.gpus for w in self.workers.values() if w.node == lead)
        gpu_indices = tuple([i for i in range(gpus_on_lead) if i not in used_gpus][: need.gpus])
        nodes = [lead, *others[: need.nodes - 1]]
        worker = min(idle[lead], key=lambda w: (load.get(w.name, 0), w.name))
        return Placement(
            key=need.key,
            allocation=self.name,
            job_id=self.job_id or "",
            worker=worker.name,
            node=lead,
            slots=tuple((n, need.slots_per_node) for n in nodes),
            gpu_indices=gpu_indices,
        )

    def fit_behind(self, need: Need, now: float, margin_s: float, per_slot: int) -> Placement | None:
        """Queue ``need`` at a busy worker (``per_slot`` per slot) whose tasks all have timeouts, if wall time holds.

        Only a one-slot, one-node task without GPUs, and with a timeout, is queued:
        it starts when any task of the worker ends, at the latest when the
        longest remaining timeout ahead of it runs out.
        """
        if (
            per_slot <= 0
            or need.nodes != 1
            or need.slots_per_node != 1
            or need.gpus
            or need.timeout_s is None
            or self.end_at is None
        ):
            return None
        ahead: dict[str, list[Placement]] = {}
        for p in self.placements.values():
            ahead.setdefault(p.worker, []).append(p)
        waiting: dict[str, int] = {}
        for q in self.queued.values():
            waiting[q.worker] = waiting.get(q.worker, 0) + 1
        best: tuple[float, str] | None = None
        for w in self.workers.values():
            running = ahead.get(w.name)
            if (
                not running
                or waiting.get(w.name, 0) >= per_slot * w.slots
                or self.quarantine.get(w.name) == w.incarnation
                or any(p.timeout_s is None or p.slots != ((w.node, 1),) or p.gpu_indices for p in running)
            ):
                continue
            # Worst case: it starts when the task ahead with the longest remaining timeout ends.
            starts = now + max(0.0, max(p.since + (p.timeout_s or 0.0) - now for p in running))
            if self.end_at - starts < need.timeout_s + margin_s:
                continue
            if best is None or (waiting.get(w.name, 0), starts) < (waiting.get(best[1], 0), best[0]):
                best = (starts, w.name)
        if best is None:
            return None
        w = self.workers[best[1]]
        return Placement(
            key=need.key,
            allocation=self.name,
            job_id=self.job_id or "",
            worker=w.name,
            node=w.node,
            slots=((w.node, 1),),
            timeout_s=need.timeout_s,
            since=now,
            queued=True,
            start_by=self.end_at - need.timeout_s - margin_s,
        )

    def to_dict(self, now: float) -> dict[str, Any]:
        """The allocation as ``site status`` shows it."""
        left = self.remaining(now)
        return {
            "name": self.name,
            "number": self.number,
            "state": self.state.value,
            "job_id": self.job_id,
            "nodes": self.nodes,
            "node_list": self.node_list,
            "requested_at": self.requested_at,
            "started_at": self.started_at,
            "end_at": self.end_at,
            "walltime_left_s": None if left is None or self.state is AllocationState.RELEASED else max(0.0, left),
            "workers": len(self.workers),
            "slots": sum(w.slots for w in self.workers.values()),
            "tasks_running": len(self.placements),
            "tasks_queued": len(self.queued),
            "pending_reason": self.pending_reason,
            "reason": self.reason,
            "released_at": self.released_at,
        }


class AllocationBackend(Protocol):
    """What an engine does for the manager."""

    async def launch(self, alloc: Allocation) -> str:
        """Submit the allocation's batch job; return its job id."""

    async def cancel(self, alloc: Allocation) -> None:
        """Cancel the allocation's job and drop what the engine holds for it (idempotent)."""

    async def workers(self) -> dict[str, list[WorkerInfo]]:
        """Connected workers, by allocation name."""


class QueueView(Protocol):
    """What the scheduler says about jobs (see ``engines.slurm_queue.SlurmQueue``)."""

    async def jobs(self, job_ids: Iterable[str]) -> dict[str, Any]:
        """Entries (``state``, ``time_left_s``, ``nodes``, ``node_list``, ``reason``, ``running``) by job id."""

    async def named(self, marker: str) -> list[Any]:
        """Entries whose job name contains ``marker``."""

    async def cancel(self, job_ids: Iterable[str]) -> None:
        """Cancel jobs by id."""


def status_path(state_dir: Path) -> Path:
    """The allocations file of a site (``site status`` reads it)."""
    return Path(state_dir) / "pilots" / "allocations.json"


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """The allocations file's content, or ``None`` if the site never held allocations."""
    try:
        content: dict[str, Any] = json.loads(status_path(state_dir).read_text())
        return content
    except (OSError, ValueError):
        return None


@dataclass
class _Waiter:
    need: Need
    future: asyncio.Future[Placement]
    since: float


class NeverFits(ValueError):
    """A task can never start on this site's allocations (the text names the setting)."""


class AllocationManager:
    """Holds allocations for one engine of one site; see the module docstring for the rules."""

    def __init__(
        self,
        settings: PilotSettings,
        backend: AllocationBackend,
        queue: QueueView,
        state_dir: Path,
        *,
        kind: str,
        label: str,
        field: str,
        clock: Callable[[], float] = time.time,
        prefetch_per_slot: int = 0,
    ) -> None:
        self.s = settings
        #: Tasks queued at a busy worker per slot, ready to start when a slot frees (see the module doc).
        self.prefetch_per_slot = prefetch_per_slot
        #: Called when a queued placement starts (a task of its worker ended): it now holds the slot.
        self.on_start: Callable[[Placement], None] = lambda p: None
        #: Called with a queued placement to take back from its worker (to place it again): ``True`` if it
        #: was taken back, ``False`` if its worker had started it already (it then holds its slot).
        self.on_take_back: Callable[[Placement], bool] = lambda p: True
        self.backend = backend
        self.queue = queue
        self.kind = kind
        self.label = label
        self.field = field
        self.clock = clock
        self.path = status_path(state_dir)
        self.token = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:6]
        #: Every job name of this site's allocations contains this.
        self.prefix = f"rxp-{self.token}-"
        self.allocations: dict[str, Allocation] = {}
        self.released: deque[Allocation] = deque(maxlen=KEEP_RELEASED)
        self.decisions: deque[str] = deque(maxlen=200)
        self._waiting: dict[str, _Waiter] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next = 1
        self._queue_due = 0.0
        self._launch_backoff_until = 0.0
        self._dirty = True
        self._written_at = 0.0
        self._closed = False

    # ---- public API ----------------------------------------------------------------------
    async def start(self) -> None:
        """Cancel what a previous agent process left, then start the planning loop."""
        await self._adopt()
        self._task = asyncio.create_task(self._loop(), name=f"allocations-{self.kind}")

    async def close(self) -> None:
        """Stop planning and cancel every allocation (by job id)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for w in self._waiting.values():
            if not w.future.done():
                w.future.cancel()
        self._waiting.clear()
        for alloc in list(self.allocations.values()):
            await self._release(alloc, "the site agent is stopping")
        self._write_status()

    def never_fits(self, need: Need) -> str | None:
        """Why no allocation of these settings could ever hold ``need`` (``None``: it can)."""
        s = self.s
        if need.slots_per_node > s.slots_per_node:
            return (
                f"the task needs {need.slots_per_node} slot(s) on one node; {self.field}.cores_per_node gives "
                f"{s.slots_per_node}"
            )
        if need.nodes > s.nodes_per_allocation:
            return f"the task needs {need.nodes} node(s); {self.field}.nodes_per_allocation is {s.nodes_per_allocation}"
        if need.gpus > s.gpus_per_node:
            return f"the task needs {need.gpus} GPU(s); {self.field}.gpus_per_node is {s.gpus_per_node}"
        if (need.timeout_s or 0) + s.walltime_margin_s > s.walltime_s:
            return (
                f"its timeout of {need.timeout_s:g}s plus walltime_margin_s {s.walltime_margin_s:g}s is longer "
                f"than {self.field}.walltime {s.walltime}: no allocation could hold it"
            )
        return None

    def try_place(self, need: Need) -> Placement | None:
        """Reserve a slot for ``need`` now if one is free, else queue it at a busy worker (``None``: it waits)."""
        now = self.clock()
        eligible = [
            a for a in self.allocations.values() if a.state is AllocationState.RUNNING and self._holds(a, need, now)
        ]
        eligible.sort(key=lambda a: a.remaining(now) or 0.0)  # soonest-ending first
        for alloc in eligible:
            p = alloc.fit(need)
            if p is not None:
                p = dataclasses.replace(p, timeout_s=need.timeout_s, since=now)
                alloc.placements[need.key] = p
                alloc.idle_since = None
                self._dirty = True
                return p
        for alloc in eligible:
            p = alloc.fit_behind(need, now, self.s.walltime_margin_s, self.prefetch_per_slot)
            if p is not None:
                alloc.queued[need.key] = p
                self._dirty = True
                return p
        return None

    async def place(self, need: Need) -> Placement:
        """Wait for a slot for ``need`` (the loop grows the allocations if needed)."""
        if self._closed:
            raise asyncio.CancelledError  # as for the tasks that waited when close() began
        p = self.try_place(need)
        if p is not None:
            return p
        fut: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._waiting[need.key] = _Waiter(need, fut, self.clock())
        self._dirty = True
        self._wake.set()
        try:
            return await fut
        finally:
            self._waiting.pop(need.key, None)

    def release(self, placement: Placement, worker_lost: bool = False) -> None:
        """The task of ``placement`` ended (or, queued, was withdrawn); with ``worker_lost`` its worker is replaced.

        The freed slot starts the task queued longest at that worker (``on_start``); a lost worker's
        queued tasks are taken back instead (``on_take_back``): they never started.
        """
        alloc = self.allocations.get(placement.allocation)
        if alloc is None:
            return
        self._dirty = True
        if alloc.queued.pop(placement.key, None) is not None:
            return
        if alloc.placements.pop(placement.key, None) is None:
            return
        if worker_lost:
            w = alloc.workers.get(placement.worker)
            if w is not None:
                alloc.quarantine[w.name] = w.incarnation
            self.take_back(alloc, placement.worker)
        else:
            nxt = next((q for q in alloc.queued.values() if q.worker == placement.worker), None)
            if nxt is not None:
                # The worker has started it already (it was waiting there): it holds the freed slot from now.
                del alloc.queued[nxt.key]
                started = dataclasses.replace(nxt, queued=False, since=self.clock())
                alloc.placements[started.key] = started
                self.on_start(started)
        if not alloc.placements:
            alloc.idle_since = self.clock()
        # Hand the freed slot to the next waiting task now: a round of the loop per task would cost
        # more than the task (the loop still re-plans on its own interval).
        self._assign()

    def lose_worker(self, placement: Placement) -> None:
        """The worker of ``placement`` is being killed (to stop its task): it takes nothing until it is replaced.

        The tasks queued at it are handed back now, before they die with it.
        """
        alloc = self.allocations.get(placement.allocation)
        if alloc is None:
            return
        w = alloc.workers.get(placement.worker)
        if w is not None:
            alloc.quarantine[w.name] = w.incarnation
        self.take_back(alloc, placement.worker)

    def take_back(
        self,
        alloc: Allocation,
        worker: str | None = None,
        limit: int | None = None,
        routine: bool = False,
        only: set[str] | None = None,
    ) -> int:
        """Hand tasks queued at ``worker`` (every worker: ``None``) of ``alloc`` back to be placed again.

        Newest first, at most ``limit``. One its worker started meanwhile stays, now holding its slot.
        Returns how many were taken back. ``routine`` (moving to a free slot) is logged at debug
        level, not kept as a decision.
        """
        back = [
            q
            for q in reversed(alloc.queued.values())
            if (worker is None or q.worker == worker) and (only is None or q.key in only)
        ][:limit]
        taken = 0
        for q in back:
            del alloc.queued[q.key]
            if self.on_take_back(q):
                taken += 1
            else:
                alloc.placements[q.key] = dataclasses.replace(q, queued=False, since=self.clock())
        if back:
            self._dirty = True
            where = "its workers" if worker is None else f"worker {worker}"
            text = (
                f"allocation {alloc.name}: {taken} task(s) queued at {where} taken back to be placed "
                f"again{f' ({len(back) - taken} had started)' if taken < len(back) else ''}"
            )
            if routine:
                log.debug("%s (%s pilots): %s, to free slots", self.label, self.kind, text)
            else:
                self._decide(text)
        return taken

    def withdraw(self, key: str) -> None:
        """Stop waiting for a slot for ``key`` (its ``place()`` raises ``CancelledError``)."""
        w = self._waiting.get(key)
        if w is not None and not w.future.done():
            w.future.cancel()

    def wake(self) -> None:
        """Re-plan now (e.g. a worker connected)."""
        self._wake.set()

    def waiting_reason(self, key: str) -> str | None:
        """Why the task ``key`` has no slot yet, in words."""
        if key not in self._waiting:
            return None
        queued = [a for a in self.allocations.values() if a.state is AllocationState.QUEUED]
        if queued:
            a = queued[0]
            why = f"pending in Slurm: {a.pending_reason}" if a.pending_reason else "starting its workers"
            return f"waiting for a pilot slot: allocation {a.name} (job {a.job_id}) is {why}"
        return "waiting for a free pilot slot"

    @property
    def waiting(self) -> int:
        """Tasks waiting for a slot."""
        return len(self._waiting)

    def snapshot(self) -> dict[str, Any]:
        """Everything ``site status`` shows."""
        now = self.clock()
        live = [a.to_dict(now) for a in sorted(self.allocations.values(), key=lambda a: a.number)]
        gone = [a.to_dict(now) for a in self.released]
        free = sum(
            max(0, s)
            for a in self.allocations.values()
            if a.state is AllocationState.RUNNING
            for s, _ in a.node_capacity().values()
        )
        return {
            "site": self.label,
            "engine": self.kind,
            "prefix": self.prefix,
            "next_number": self._next,
            "updated": now,
            "pid": os.getpid(),
            "settings": {
                "min_allocations": self.s.min_allocations,
                "max_allocations": self.s.max_allocations,
                "nodes_per_allocation": self.s.nodes_per_allocation,
                "walltime": self.s.walltime,
                "idle_timeout_s": self.s.idle_timeout_s,
                "slots_per_allocation": self.s.slots_per_allocation,
            },
            "waiting_tasks": len(self._waiting),
            "free_slots": free,
            "allocations": live + gone,
            "decisions": list(self.decisions)[-20:],
        }

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.s.poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: allocation planning failed; trying again", self.label)

    async def tick(self) -> None:
        """One round: refresh what workers and the scheduler say, place waiting tasks, scale."""
        now = self.clock()
        await self._refresh_workers(now)
        if now >= self._queue_due or any(
            a.state is AllocationState.RUNNING and a.end_at is None for a in self.allocations.values()
        ):
            await self._refresh_queue(now)
        self._assign()
        await self._scale(self.clock())
        self._metrics()
        # Placements change the file many times a second under load: write it at most once a second.
        if self._dirty and self.clock() - self._written_at >= 1.0:
            self._write_status()

    async def _refresh_workers(self, now: float) -> None:
        by_alloc = await self.backend.workers()
        for alloc in list(self.allocations.values()):
            seen = {w.name: w for w in by_alloc.get(alloc.name, [])}
            if seen.keys() != alloc.workers.keys() or any(seen[k] != alloc.workers[k] for k in seen):
                self._dirty = True
            alloc.workers = seen
            # A quarantined worker is usable again once it is gone or came back as a new process.
            alloc.quarantine = {
                n: inc for n, inc in alloc.quarantine.items() if n in seen and seen[n].incarnation == inc
            }
            if alloc.state is AllocationState.QUEUED and seen:
                alloc.state = AllocationState.RUNNING
                alloc.started_at = now
                alloc.idle_since = now if not alloc.placements else None
                self._decide(
                    f"allocation {alloc.name} (job {alloc.job_id}) is running: {len(seen)} worker(s), "
                    f"{sum(w.slots for w in seen.values())} slot(s) connected"
                )

    async def _refresh_queue(self, now: float) -> None:
        self._queue_due = now + self.s.queue_poll_s
        live = [a for a in self.allocations.values() if a.job_id]
        if not live:
            return
        entries = await self.queue.jobs(a.job_id for a in live if a.job_id)
        for alloc in live:
            e = entries.get(alloc.job_id or "")
            if e is None:
                if now - alloc.requested_at > 2.0:  # sbatch returned, so squeue has had time to list it
                    await self._release(
                        alloc,
                        f"its Slurm job {alloc.job_id} ended (time limit, node failure or scancel outside the site)",
                        cancel=False,
                    )
                continue
            alloc.node_list = e.node_list or alloc.node_list
            if e.running:
                if alloc.slurm_running_at is None:
                    alloc.slurm_running_at = now
                if e.time_left_s is not None:
                    end = now + e.time_left_s
                    if alloc.end_at is None or abs(end - alloc.end_at) > 2.0:
                        alloc.end_at = end
                        self._dirty = True
                alloc.pending_reason = ""
            else:
                if e.reason != alloc.pending_reason:
                    alloc.pending_reason = e.reason
                    self._dirty = True
            if (
                alloc.state is AllocationState.QUEUED
                and alloc.slurm_running_at is not None
                and now - alloc.slurm_running_at > self.s.connect_timeout_s
            ):
                await self._release(
                    alloc,
                    f"its job has run for {now - alloc.slurm_running_at:.0f}s but no worker connected "
                    f"(connect_timeout_s {self.s.connect_timeout_s:g}); check {self.field}.address/interface, "
                    "the firewall and the job's output",
                )

    def _holds(self, alloc: Allocation, need: Need, now: float) -> bool:
        left = alloc.remaining(now)
        return left is not None and left >= (need.timeout_s or 0.0) + self.s.walltime_margin_s

    def _has_room(self) -> bool:
        """Whether any running allocation has a free slot, or room in a worker's queue, that can take a task."""
        for a in self.allocations.values():
            if a.state is not AllocationState.RUNNING:
                continue
            if self.prefetch_per_slot and len(a.queued) < self.prefetch_per_slot * sum(
                w.slots for w in a.workers.values()
            ):
                return True
            load = a.worker_load()
            free_nodes = {n for n, (slots, _g) in a.node_capacity().items() if slots > 0}
            if any(
                w.node in free_nodes and load.get(w.name, 0) < w.slots and a.quarantine.get(w.name) != w.incarnation
                for w in a.workers.values()
            ):
                return True
        return False

    def _assign(self) -> None:
        """Give free slots to waiting tasks, in arrival order (a task that does not fit does not block others)."""
        failed: set[tuple[int, int, int, float | None]] = set()
        for w in list(self._waiting.values()):
            if not self._has_room():
                return  # the common case under load: stop at once rather than try every waiting task
            if w.future.done():
                continue
            # A task like one that found no room finds none either (many waiting tasks are alike).
            shape = (w.need.slots_per_node, w.need.nodes, w.need.gpus, w.need.timeout_s)
            if shape in failed:
                continue
            p = self.try_place(w.need)
            if p is not None:
                w.future.set_result(p)
            else:
                failed.add(shape)
        self._rebalance()

    def _rebalance(self) -> None:
        """Free slots nobody waits for take tasks queued at busy workers (e.g. a new allocation's slots).

        Each is taken back and placed again at once, on a free slot.
        """
        queued = [a for a in self.allocations.values() if a.queued]
        if not queued or any(not w.future.done() for w in self._waiting.values()):
            return
        now = self.clock()
        free = 0
        for a in self.allocations.values():
            if a.state is AllocationState.RUNNING and a.end_at is not None:
                load = a.worker_load()
                idle = sum(
                    w.slots - load.get(w.name, 0)
                    for w in a.workers.values()
                    if load.get(w.name, 0) < w.slots and a.quarantine.get(w.name) != w.incarnation
                )
                free += min(idle, sum(max(0, s) for s, _g in a.node_capacity().values()))
        for alloc in queued:
            if free <= 0:
                return
            movable = {
                q.key for q in alloc.queued.values() if self._fits_now(Need(key=q.key, timeout_s=q.timeout_s), now)
            }
            if movable:
                free -= self.take_back(alloc, None, min(free, len(movable)), routine=True, only=movable)

    def _fits_now(self, need: Need, now: float) -> bool:
        """Whether a free slot (not a worker's queue) could take ``need`` now."""
        return any(
            a.state is AllocationState.RUNNING and self._holds(a, need, now) and a.fit(need) is not None
            for a in self.allocations.values()
        )

    async def _scale(self, now: float) -> None:
        s = self.s
        # Drain what is near its end.
        for alloc in self.allocations.values():
            left = alloc.remaining(now)
            if alloc.state is AllocationState.RUNNING and left is not None and left < s.drain_s:
                alloc.state = AllocationState.DRAINING
                self._decide(
                    f"allocation {alloc.name}: {left:.0f}s of wall time left < drain_s {s.drain_s:g}: "
                    f"draining ({len(alloc.placements)} task(s) finishing, no new ones)"
                )
        for alloc in list(self.allocations.values()):
            if alloc.state is AllocationState.DRAINING and not alloc.placements:
                await self._release(alloc, "drained: its tasks ended")

        waiting = [w for w in self._waiting.values() if not w.future.done()]
        active = [a for a in self.allocations.values() if a.state in (AllocationState.QUEUED, AllocationState.RUNNING)]
        # Slots the active allocations have or will have once all their workers connected.
        free_now = sum(
            max(0, c) for a in active if a.state is AllocationState.RUNNING for c, _ in a.node_capacity().values()
        )
        coming = sum(max(0, s.slots_per_allocation - sum(w.slots for w in a.workers.values())) for a in active)
        # Tasks no running allocation could ever hold (wall time left) need a new one whatever the free slots.
        running = [a for a in active if a.state is AllocationState.RUNNING]
        stranded = [
            w
            for w in waiting
            if running
            and not any(self._holds(a, w.need, now) for a in running)
            and not any(a.state is AllocationState.QUEUED for a in active)
        ]
        # Tasks queued at busy workers wait for a slot too (they move to a new allocation's free slots).
        queued = sum(len(a.queued) for a in active)
        backlog_slots = sum(w.need.slots for w in waiting) + queued
        want = 0
        why = ""
        if stranded:
            want = max(1, math.ceil(sum(w.need.slots for w in stranded) / s.slots_per_allocation))
            why = (
                f"{len(stranded)} task(s) need more wall time than any running allocation has left "
                f"(timeout {stranded[0].need.timeout_s or 0:g}s + margin {s.walltime_margin_s:g}s)"
            )
        elif (waiting or queued) and backlog_slots > free_now + coming:
            want = math.ceil((backlog_slots - free_now - coming) / s.slots_per_allocation)
            behind = f", {queued} of them queued at busy workers" if queued else ""
            why = (
                f"backlog {len(waiting) + queued} task(s) ({backlog_slots} slots{behind}) > {free_now + coming} "
                "free slot(s)"
            )
        if len(active) + want < s.min_allocations:
            want = s.min_allocations - len(active)
            why = f"{len(active)} allocation(s) < min_allocations {s.min_allocations}"
        room = s.max_allocations - len(active)
        if want > room and stranded:
            # At the maximum: drain the allocation ending soonest among those that cannot hold the task.
            victims = sorted(
                (a for a in active if a.state is AllocationState.RUNNING and not self._holds(a, stranded[0].need, now)),
                key=lambda a: a.remaining(now) or 0.0,
            )
            if victims and room <= 0:
                v = victims[0]
                v.state = AllocationState.DRAINING
                self._decide(
                    f"allocation {v.name}: {v.remaining(now) or 0:.0f}s left cannot hold a waiting task's "
                    f"{stranded[0].need.timeout_s or 0:g}s timeout and the site is at max_allocations "
                    f"{s.max_allocations}: draining it to make room"
                )
                room += 1
                if not v.placements:
                    await self._release(v, "drained to make room for a longer task")
        want = min(want, room)
        if want > 0 and now >= self._launch_backoff_until:
            for _ in range(want):
                n = (
                    len(
                        [
                            a
                            for a in self.allocations.values()
                            if a.state in (AllocationState.QUEUED, AllocationState.RUNNING)
                        ]
                    )
                    + 1
                )
                await self._request(f"{why}: requesting allocation {n} of {s.max_allocations}")
        # Release what has been idle too long, down to min_allocations.
        for alloc in sorted(self.allocations.values(), key=lambda a: a.remaining(now) or 0.0):
            active_n = len(
                [a for a in self.allocations.values() if a.state in (AllocationState.QUEUED, AllocationState.RUNNING)]
            )
            if active_n <= s.min_allocations or alloc.state not in (AllocationState.QUEUED, AllocationState.RUNNING):
                continue
            since = alloc.idle_since if alloc.state is AllocationState.RUNNING else alloc.requested_at
            if alloc.placements or since is None or now - since < s.idle_timeout_s:
                continue
            if waiting and (
                alloc.state is AllocationState.QUEUED or any(self._holds(alloc, w.need, now) for w in waiting)
            ):
                continue  # it may yet serve a waiting task
            await self._release(alloc, f"idle for {now - since:.0f}s >= idle_timeout_s {s.idle_timeout_s:g}")

    async def _request(self, why: str) -> None:
        number = self._next
        self._next += 1
        alloc = Allocation(
            name=f"{self.prefix}a{number}", number=number, nodes=self.s.nodes_per_allocation, requested_at=self.clock()
        )
        self.allocations[alloc.name] = alloc
        self._decide(why)
        self._write_status()  # recorded before the job exists: a crash in between is found by name
        try:
            alloc.job_id = await self.backend.launch(alloc)
        except Exception as exc:
            self._launch_backoff_until = self.clock() + 30.0
            await self._release(alloc, f"the scheduler refused it: {exc}", cancel=False)
            log.warning("%s: could not submit allocation %s: %s (trying again in 30 s)", self.label, alloc.name, exc)
            return
        alloc.reason = why
        self._queue_due = 0.0
        self._decide(f"allocation {alloc.name} submitted as Slurm job {alloc.job_id}")
        self._write_status()

    async def _release(self, alloc: Allocation, why: str, cancel: bool = True) -> None:
        if alloc.state is AllocationState.RELEASED:
            return
        alloc.state = AllocationState.RELEASED
        alloc.reason = why
        alloc.released_at = self.clock()
        self.allocations.pop(alloc.name, None)
        self.released.append(alloc)
        self._decide(f"releasing allocation {alloc.name} (job {alloc.job_id}): {why}")
        if not self._closed:
            self.take_back(alloc)  # before the job is cancelled: its queued tasks never started
        try:
            await self.backend.cancel(alloc)
            if cancel and alloc.job_id:
                await self.queue.cancel([alloc.job_id])
        except Exception as exc:
            log.warning("%s: cancelling job %s failed: %s", self.label, alloc.job_id, exc)
        self._write_status()

    async def _adopt(self) -> None:
        """Cancel allocations a previous agent process left: recorded ones, and any job with our prefix."""
        previous = read_status(self.path.parent.parent) or {}
        self._next = max(self._next, int(previous.get("next_number", 1)))
        recorded = {
            a["job_id"]: a
            for a in previous.get("allocations", [])
            if a.get("job_id") and a.get("state") != AllocationState.RELEASED.value
        }
        # Every job of ours carries the prefix in its name, recorded or not (a crash right after sbatch).
        found = {e.job_id: e for e in await self.queue.named(self.prefix)}
        ids = sorted(found)
        for a in previous.get("allocations", []):
            if a.get("state") == AllocationState.RELEASED.value:
                self.released.append(_from_dict(a))
        for job_id, d in recorded.items():
            if job_id not in found:
                # Its workers lost their scheduler/interchange with the previous process and left.
                a = _from_dict(d)
                a.state, a.released_at = AllocationState.RELEASED, self.clock()
                a.reason = (
                    f"ended while no agent held it (the previous agent process, pid "
                    f"{previous.get('pid', '?')}, had stopped)"
                )
                self.released.append(a)
                self._dirty = True
        if not ids:
            self._write_status()
            return
        await self.queue.cancel(ids)
        why = (
            f"left by a previous agent process (pid {previous.get('pid', '?')}): its workers served that "
            f"process's {'scheduler' if self.kind == 'dask' else 'interchange'}; cancelled by job id"
        )
        for job_id in ids:
            a = _from_dict(recorded.get(job_id) or {"name": found[job_id].name, "job_id": job_id})
            a.state, a.reason, a.released_at = AllocationState.RELEASED, why, self.clock()
            self.released.append(a)
        self._decide(f"cancelled {len(ids)} allocation(s) {why} (Slurm job(s) {', '.join(ids)})")
        self._write_status()

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _decide(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.clock()))
        self.decisions.append(f"{stamp} {text}")
        self._dirty = True
        log.info("%s (%s pilots): %s", self.label, self.kind, text)

    def _metrics(self) -> None:
        counts = {st: 0 for st in AllocationState}
        for a in self.allocations.values():
            counts[a.state] += 1
        counts[AllocationState.RELEASED] = len(self.released)
        for st, n in counts.items():
            ALLOCATIONS.labels(self.label, st.value).set(n)
        snap_free = sum(
            max(0, s)
            for a in self.allocations.values()
            if a.state is AllocationState.RUNNING
            for s, _ in a.node_capacity().values()
        )
        FREE_SLOTS.labels(self.label).set(snap_free)
        WAITING.labels(self.label).set(len(self._waiting))

    def _write_status(self) -> None:
        self._dirty = False
        self._written_at = self.clock()
        try:
            # The worker's atomic JSON writer (temp file, fsync, rename): a reader sees all of it or nothing.
            write_outcome(str(self.path), self.snapshot())
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.label, self.path, exc)


def _from_dict(d: dict[str, Any]) -> Allocation:
    a = Allocation(
        name=str(d.get("name", "?")),
        number=int(d.get("number") or 0),
        nodes=int(d.get("nodes") or 0),
        requested_at=float(d.get("requested_at") or 0.0),
        job_id=d.get("job_id"),
    )
    a.state = AllocationState(d.get("state", AllocationState.RELEASED.value))
    a.reason = str(d.get("reason", ""))
    a.released_at = d.get("released_at")
    a.started_at = d.get("started_at")
    a.node_list = str(d.get("node_list", ""))
    return a
