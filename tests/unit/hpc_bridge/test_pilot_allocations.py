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


def manager(tmp_path: Path, c: Cluster, **settings: Any) -> AllocationManager:
    s = PilotSettings.model_validate({"cores_per_node": c.slots, "walltime": "00:03:00", "idle_timeout_s": 30,
                                      "walltime_margin_s": 10, "drain_s": 20, **settings})
    return AllocationManager(s, c, Queue(c), tmp_path, kind="dask", label="hpc", field="engine.dask.jobqueue",
                             clock=lambda: c.now)


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
    assert any("backlog 5 task(s) (5 slots) > 0 free slot(s): requesting allocation 2 of 2" in d
               for d in m.decisions), list(m.decisions)
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
    assert any("need more wall time than any running allocation has left (timeout 120s + margin 10s)" in d
               for d in m.decisions)
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
    (tmp_path / "pilots" / "allocations.json").write_text(json.dumps({
        "next_number": 4, "pid": 4242,
        "allocations": [{"name": f"{m.prefix}a3", "number": 3, "job_id": "7", "state": "running"},
                        {"name": f"{m.prefix}a2", "number": 2, "job_id": "6", "state": "running"}]}))
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
    assert m.waiting_reason("t") == f"waiting for a pilot slot: allocation {m.prefix}a1 (job 100) is pending in " \
                                    f"Slurm: {pending_reason}"
    m.withdraw("t")
    with pytest.raises(asyncio.CancelledError):
        await w
