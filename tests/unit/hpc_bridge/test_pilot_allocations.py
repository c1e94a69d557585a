"""The allocation manager's decisions, with a scripted scheduler and clock (real runs: test_pilot_slurm.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reflexarc.hpc_bridge.allocations import (
    Allocation,
    AllocationManager,
    AllocationState,
    Need,
    WorkerInfo,
    read_status,
)
from reflexarc.hpc_bridge.site_config import PilotSettings


@dataclass
class Entry:
    """What the fake squeue says about one job."""

    job_id: str
    name: str
    state: str = "PENDING"
    time_left_s: float | None = None
    nodes: int = 1
    node_list: str = ""
    reason: str = "Priority"

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


class Cluster:
    """A scripted scheduler + engine: jobs start when told, with the wall time given."""

    def __init__(self, slots: int = 2) -> None:
        self.now = 1000.0
        self.slots = slots
        self.entries: dict[str, Entry] = {}
        self.workers_by_alloc: dict[str, list[WorkerInfo]] = {}
        self.cancelled: list[str] = []
        self.next_id = 100

    # backend
    async def launch(self, alloc: Allocation) -> str:
        job = str(self.next_id)
        self.next_id += 1
        self.entries[job] = Entry(job, alloc.name)
        return job

    async def cancel(self, alloc: Allocation) -> None:
        self.workers_by_alloc.pop(alloc.name, None)

    async def workers(self) -> dict[str, list[WorkerInfo]]:
        return {k: list(v) for k, v in self.workers_by_alloc.items()}

    # queue
    async def jobs(self, job_ids: Iterable[str]) -> dict[str, Entry]:
        ids = set(job_ids)
        return {j: e for j, e in self.entries.items() if j in ids}

    async def named(self, marker: str) -> list[Entry]:
        return [e for e in self.entries.values() if marker in e.name]

    async def cancel_jobs(self, job_ids: Iterable[str]) -> None:
        for j in job_ids:
            self.cancelled.append(j)
            self.entries.pop(j, None)

    # test controls
    def start(self, alloc: str, time_left_s: float) -> None:
        """The job of ``alloc`` starts running with ``time_left_s`` and its worker connects."""
        e = next(e for e in self.entries.values() if e.name == alloc)
        e.state, e.time_left_s = "RUNNING", time_left_s
        self.workers_by_alloc[alloc] = [WorkerInfo(f"{alloc}-0", f"node-{alloc}", self.slots, incarnation="i1")]


class Queue:
    """QueueView over a Cluster (cancel is separate from the backend's)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c

    async def jobs(self, job_ids: Iterable[str]) -> dict[str, Entry]:
        return await self.c.jobs(job_ids)

    async def named(self, marker: str) -> list[Entry]:
        return await self.c.named(marker)

    async def cancel(self, job_ids: Iterable[str]) -> None:
        await self.c.cancel_jobs(job_ids)


def manager(tmp_path: Path, c: Cluster, prefetch: int = 0, **settings: Any) -> AllocationManager:
    s = PilotSettings.model_validate(
        {
            "cores_per_node": c.slots,
            "walltime": "00:03:00",
            "idle_timeout_s": 30,
            "walltime_margin_s": 10,
            "drain_s": 20,
            **settings,
        }
    )
    return AllocationManager(
        s,
        c,
        Queue(c),
        tmp_path,
        kind="dask",
        label="hpc",
        field="engine.dask.jobqueue",
        clock=lambda: c.now,
        prefetch_per_slot=prefetch,
    )


async def tick(m: AllocationManager) -> None:
    """One planning round, then let the tasks it woke run."""
    await m.tick()
    for _ in range(3):
        await asyncio.sleep(0)


def need(key: str, timeout: float | None = 30.0, slots: int = 1) -> Need:
    return Need(key=key, slots_per_node=slots, timeout_s=timeout)


async def test_backlog_grows_to_max_and_idle_releases(tmp_path: Path) -> None:
    c = Cluster(slots=2)
    m = manager(tmp_path, c, max_allocations=2)
    waits = [asyncio.ensure_future(m.place(need(f"t{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    await tick(m)
    # 5 slots of backlog, 2 per allocation: both allocations at once, not more than max.
    assert [a.job_id for a in m.allocations.values()] == ["100", "101"]
    assert any(
        "backlog 5 task(s) (5 slots) > 0 free slot(s): requesting allocation 2 of 2" in d for d in m.decisions
    ), list(m.decisions)
    c.start(f"{m.prefix}a1", 170)
    await tick(m)
    placed = [w.result() for w in waits if w.done()]
    assert len(placed) == 2 and {p.allocation for p in placed} == {f"{m.prefix}a1"}
    c.start(f"{m.prefix}a2", 170)
    await tick(m)
    assert sum(w.done() for w in waits) == 4
    for p in placed:
        m.release(p)
    await tick(m)
    assert all(w.done() for w in waits)
    for w in waits:
        m.release(w.result())
    c.now += 29
    await tick(m)
    assert len(m.allocations) == 2
    c.now += 2
    await tick(m)
    assert not m.allocations and sorted(c.cancelled) == ["100", "101"]
    status = read_status(tmp_path)
    assert status is not None
    assert [a["state"] for a in status["allocations"]] == ["released", "released"]
    assert "idle for 31s >= idle_timeout_s 30" in status["allocations"][0]["reason"]


async def test_walltime_rule_short_task_stays_long_task_gets_new_allocation(tmp_path: Path) -> None:
    c = Cluster(slots=4)
    m = manager(tmp_path, c, max_allocations=2)
    first = asyncio.ensure_future(m.place(need("warm", 1)))
    await asyncio.sleep(0)
    await tick(m)
    a1 = f"{m.prefix}a1"
    c.start(a1, 90)  # 90 s of wall time left
    await tick(m)
    m.release(first.result())
    # 30 s task: 90 >= 30 + 10 -> placed at once on a1.
    short = m.try_place(need("short", 30))
    assert short is not None and short.allocation == a1
    # 120 s task: 90 < 120 + 10 -> not on a1 although it has free slots; a new allocation is asked for.
    assert m.try_place(need("long", 120)) is None
    long_wait = asyncio.ensure_future(m.place(need("long", 120)))
    await asyncio.sleep(0)
    await tick(m)
    assert not long_wait.done()
    assert f"{m.prefix}a2" in m.allocations
    assert any(
        "need more wall time than any running allocation has left (timeout 120s + margin 10s)" in d for d in m.decisions
    )
    c.start(f"{m.prefix}a2", 178)
    await tick(m)
    assert long_wait.result().allocation == f"{m.prefix}a2"


async def test_at_max_the_allocation_ending_soonest_is_drained_and_replaced(tmp_path: Path) -> None:
    c = Cluster(slots=2)
    m = manager(tmp_path, c, max_allocations=1)
    t = asyncio.ensure_future(m.place(need("a", 5)))
    await asyncio.sleep(0)
    await tick(m)
    a1 = f"{m.prefix}a1"
    c.start(a1, 60)
    await tick(m)
    busy = t.result()
    long_wait = asyncio.ensure_future(m.place(need("long", 120)))
    await asyncio.sleep(0)
    await tick(m)
    # a1 cannot hold 120 s; at max_allocations 1 it is drained (its task finishes) and replaced.
    assert m.allocations[a1].state is AllocationState.DRAINING
    assert f"{m.prefix}a2" in m.allocations
    assert m.try_place(need("small", 5)) is None  # nothing new on a draining allocation
    m.release(busy)
    await tick(m)
    assert a1 not in m.allocations and "100" in c.cancelled
    c.start(f"{m.prefix}a2", 178)
    await tick(m)
    assert long_wait.result().allocation == f"{m.prefix}a2"


async def test_near_its_end_an_allocation_drains_then_is_released(tmp_path: Path) -> None:
    c = Cluster(slots=2)
    m = manager(tmp_path, c, min_allocations=1, max_allocations=2)
    await tick(m)
    a1 = f"{m.prefix}a1"
    assert "min_allocations 1" in m.decisions[-2]
    c.start(a1, 100)
    await tick(m)
    p = m.try_place(need("x", 10))
    assert p is not None
    c.entries["100"].time_left_s = 15  # the scheduler now says 15 s left
    c.now += 11  # past queue_poll_s
    await tick(m)
    assert m.allocations[a1].state is AllocationState.DRAINING
    # Kept at min_allocations: a replacement is asked for while a1 drains.
    assert f"{m.prefix}a2" in m.allocations
    m.release(p)
    await tick(m)
    assert a1 not in m.allocations
    assert any("drained" in d for d in m.decisions)


async def test_never_fits_names_the_setting(tmp_path: Path) -> None:
    m = manager(tmp_path, Cluster(slots=2))
    assert "engine.dask.jobqueue.walltime 00:03:00" in (m.never_fits(need("x", 175)) or "")
    assert "engine.dask.jobqueue.cores_per_node" in (m.never_fits(need("x", 10, slots=3)) or "")
    assert "gpus_per_node" in (m.never_fits(Need("g", gpus=1)) or "")
    assert m.never_fits(need("x", 170)) is None


async def test_slots_and_gpus_are_reserved_per_node(tmp_path: Path) -> None:
    c = Cluster(slots=4)
    m = manager(tmp_path, c, gpus_per_node=2)
    t = asyncio.ensure_future(m.place(Need("g1", gpus=1, timeout_s=5)))
    await asyncio.sleep(0)
    await tick(m)
    a1 = f"{m.prefix}a1"
    c.entries["100"].state, c.entries["100"].time_left_s = "RUNNING", 170
    c.workers_by_alloc[a1] = [WorkerInfo(f"{a1}-{i}", "n1", 1, gpus=2, incarnation="x") for i in range(4)]
    await tick(m)
    g1 = t.result()
    g2 = m.try_place(Need("g2", gpus=1, timeout_s=5))
    assert g2 is not None and {g1.gpu_indices, g2.gpu_indices} == {(0,), (1,)}
    assert g1.worker != g2.worker
    assert m.try_place(Need("g3", gpus=1, timeout_s=5)) is None  # both GPUs taken, CPU slots left
    cpu = m.try_place(Need("c", slots_per_node=2, timeout_s=5))
    assert cpu is not None and cpu.gpu_indices == ()
    assert m.try_place(Need("c2", timeout_s=5)) is None  # 4 slots reserved
    # A cancelled task's worker is replaced: it takes nothing until it comes back as a new process.
    m.release(g1, worker_lost=True)
    m.release(cpu)
    again = m.try_place(Need("g4", gpus=1, timeout_s=5))
    assert again is not None and again.worker != g1.worker and again.gpu_indices == g1.gpu_indices


async def test_start_cancels_jobs_a_previous_process_left(tmp_path: Path) -> None:
    c = Cluster()
    m = manager(tmp_path, c)
    await tick(m)  # nothing to do
    m.allocations.clear()
    # A previous run's job, recorded and still in the queue; and a stranger's job.
    c.entries["7"] = Entry("7", f"{m.prefix}a3", state="RUNNING")
    c.entries["8"] = Entry("8", "someone-else")
    (tmp_path / "pilots").mkdir(exist_ok=True)
    (tmp_path / "pilots" / "allocations.json").write_text(
        json.dumps(
            {
                "next_number": 4,
                "pid": 4242,
                "allocations": [
                    {"name": f"{m.prefix}a3", "number": 3, "job_id": "7", "state": "running"},
                    {"name": f"{m.prefix}a2", "number": 2, "job_id": "6", "state": "running"},
                ],
            }
        )
    )
    m2 = manager(tmp_path, c)
    await m2.start()
    try:
        assert c.cancelled == ["7"] and "8" in c.entries
        assert m2._next == 4
        gone = [a for a in m2.snapshot()["allocations"] if a["job_id"] == "7"]
        assert gone[0]["state"] == "released" and "previous agent process (pid 4242)" in gone[0]["reason"]
        # Job 6 ended by itself meanwhile (its workers lost their scheduler): reported, not cancelled.
        ended = [a for a in m2.snapshot()["allocations"] if a["job_id"] == "6"]
        assert ended[0]["state"] == "released" and "ended while no agent held it" in ended[0]["reason"]
    finally:
        await m2.close()


@pytest.mark.parametrize("pending_reason", ["Resources"])
async def test_waiting_reason_names_the_pending_allocation(tmp_path: Path, pending_reason: str) -> None:
    c = Cluster()
    m = manager(tmp_path, c)
    w = asyncio.ensure_future(m.place(need("t")))
    await asyncio.sleep(0)
    await tick(m)
    c.entries["100"].reason = pending_reason
    c.now += 11
    await tick(m)
    assert (
        m.waiting_reason("t") == f"waiting for a pilot slot: allocation {m.prefix}a1 (job 100) is pending in "
        f"Slurm: {pending_reason}"
    )
    m.withdraw("t")
    with pytest.raises(asyncio.CancelledError):
        await w


async def running_manager(tmp_path: Path, c: Cluster, time_left_s: float, **kw: Any) -> AllocationManager:
    """A manager with one running allocation (one worker of ``c.slots`` slots) and prefetch 1."""
    m = manager(tmp_path, c, prefetch=1, min_allocations=1, **kw)
    await tick(m)
    c.start(f"{m.prefix}a1", time_left_s)
    await tick(m)
    return m


async def test_prefetch_queues_one_task_per_busy_slot_and_starts_it_when_a_slot_frees(tmp_path: Path) -> None:
    c = Cluster(slots=2)
    m = await running_manager(tmp_path, c, 170)
    started: list[str] = []
    m.on_start = lambda p: started.append(p.key)
    run = [m.try_place(need(f"r{i}", 30)) for i in range(2)]
    assert all(p is not None and not p.queued for p in run)
    queued = [m.try_place(need(f"q{i}", 30)) for i in range(2)]
    assert all(p is not None and p.queued and p.start_by == c.now + 170 - 30 - 10 for p in queued)
    # One per slot: the fifth waits for a slot, and the queued ones hold none (no free slot is reported).
    assert m.try_place(need("w", 30)) is None
    waiting = asyncio.ensure_future(m.place(need("w", 30)))
    await asyncio.sleep(0)
    alloc = m.allocations[f"{m.prefix}a1"]
    assert alloc.to_dict(c.now)["tasks_queued"] == 2 and m.snapshot()["free_slots"] == 0
    # A task ends: the task queued longest holds its slot now (its worker started it), and the waiting
    # task takes the freed place in the worker's queue at once, without a planning round.
    c.now += 1
    p0 = run[0]
    assert p0 is not None
    m.release(p0)
    assert started == ["q0"] and alloc.placements["q0"].since == c.now and not alloc.placements["q0"].queued
    await asyncio.sleep(0)
    assert waiting.done() and waiting.result().queued
    assert list(alloc.queued) == ["q1", "w"]
    # A queued task withdrawn (cancelled) frees its place in the queue and starts nothing.
    q1 = queued[1]
    assert q1 is not None
    m.release(q1)
    assert list(alloc.queued) == ["w"] and started == ["q0"]


async def test_prefetch_only_where_wall_time_holds_the_tasks_ahead(tmp_path: Path) -> None:
    c = Cluster(slots=1)
    m = await running_manager(tmp_path, c, 90)
    busy = m.try_place(need("busy", 50))  # may run until now + 50
    assert busy is not None and not busy.queued
    # Queued behind it, a task may start 50 s from now: 90 - 50 = 40 s left >= 30 + 10, but not >= 31 + 10.
    assert m.try_place(need("late", 31)) is None
    ok = m.try_place(need("fits", 30))
    assert ok is not None and ok.queued and ok.start_by == c.now + 90 - 30 - 10
    m.release(ok)
    # Only one-slot tasks with a timeout are queued, and only behind tasks that have one.
    assert m.try_place(need("no-timeout", None)) is None
    assert m.try_place(Need("gpu", gpus=1, timeout_s=5)) is None
    m.release(busy)
    forever = m.try_place(need("forever", None))
    assert forever is not None and not forever.queued
    assert m.try_place(need("behind-forever", 5)) is None


async def test_prefetched_tasks_are_taken_back_from_a_lost_worker_and_a_released_allocation(tmp_path: Path) -> None:
    c = Cluster(slots=1)
    m = await running_manager(tmp_path, c, 170, max_allocations=2)
    back: list[str] = []
    started: list[str] = []
    m.on_take_back = lambda p: back.append(p.key) is None  # taken back (not started by its worker)
    m.on_start = lambda p: started.append(p.key)
    busy = m.try_place(need("busy", 30))
    q = m.try_place(need("q", 30))
    assert busy is not None and q is not None and q.queued
    # Its worker died (or was killed to stop its task): the queued task never started; it is handed back.
    m.release(busy, worker_lost=True)
    assert back == ["q"] and started == [] and not m.allocations[f"{m.prefix}a1"].queued
    assert any("1 task(s) queued at worker" in d and "taken back" in d for d in m.decisions)
    # A new incarnation of the worker takes tasks again; then the allocation's job ends outside the site.
    a1 = f"{m.prefix}a1"
    c.workers_by_alloc[a1] = [WorkerInfo(f"{a1}-0", f"node-{a1}", 1, incarnation="i2")]
    await tick(m)
    busy2 = m.try_place(need("busy2", 30))
    q2 = m.try_place(need("q2", 30))
    assert busy2 is not None and q2 is not None and q2.queued
    c.entries.clear()  # the job left squeue (time limit, node failure, scancel by hand)
    c.now += 11
    await tick(m)
    assert a1 not in m.allocations and back == ["q", "q2"]


async def test_queued_tasks_count_as_backlog_and_move_to_a_new_allocations_free_slots(tmp_path: Path) -> None:
    c = Cluster(slots=1)
    m = await running_manager(tmp_path, c, 170, max_allocations=2)
    a1, a2 = f"{m.prefix}a1", f"{m.prefix}a2"
    verdict = {"q": True}
    back: list[str] = []

    def take_back(p: Any) -> bool:
        back.append(p.key)
        return verdict.get(p.key, True)

    m.on_take_back = take_back
    busy = m.try_place(need("busy", 30))
    q = m.try_place(need("q", 30))
    assert busy is not None and q is not None and q.queued
    # Nothing waits in the manager, but a task queued at a busy worker is backlog: a second allocation.
    await tick(m)
    assert a2 in m.allocations
    assert any(
        "backlog 1 task(s) (1 slots, 1 of them queued at busy workers) > 0 free slot(s): requesting "
        "allocation 2 of 2" in d
        for d in m.decisions
    ), list(m.decisions)
    # Its worker connects: the queued task is taken back, to start at once on the free slot.
    c.start(a2, 170)
    await tick(m)
    assert back == ["q"] and not m.allocations[a1].queued
    p = m.try_place(need("q", 30))
    assert p is not None and p.allocation == a2 and not p.queued


async def test_a_task_its_worker_started_meanwhile_is_not_taken_back(tmp_path: Path) -> None:
    c = Cluster(slots=1)
    m = await running_manager(tmp_path, c, 170)
    m.on_take_back = lambda p: False  # the worker had claimed it (see pilot_worker.claim)
    busy = m.try_place(need("busy", 30))
    q = m.try_place(need("q", 30))
    assert busy is not None and q is not None
    alloc = m.allocations[f"{m.prefix}a1"]
    assert m.take_back(alloc) == 0
    assert not alloc.queued and "q" in alloc.placements and not alloc.placements["q"].queued
    assert any(
        "0 task(s) queued at its workers taken back to be placed again (1 had started)" in d for d in m.decisions
    )
