"""The agent's async job store: operations of the same moment share a transaction; errors stay with their caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.service import jobs as jobs_module
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Batch, JobStore, NewJob, Outcome, Pending
from reflexarc.topics import Topics


@pytest.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[AsyncJobStore]:
    store = await AsyncJobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}", "hpc", Topics())
    yield store
    await store.close()


def count_transactions(store: AsyncJobStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the transactions the store runs from now on (operations in each)."""
    sizes: list[int] = []
    run = store.store.run

    def counting(ops: Sequence[Callable[[Batch], Any]]) -> tuple[list[Any], list[Pending]]:
        sizes.append(len(ops))
        return run(ops)

    monkeypatch.setattr(store.store, "run", counting)
    return sizes


def new(task_id: str) -> NewJob:
    return NewJob(TaskRequest(task_id=task_id, app="a", site="hpc"))


async def test_operations_of_one_moment_share_a_transaction(
    jobs: AsyncJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await jobs.create([new(f"t{i}") for i in range(20)])
    claimed = await jobs.claim(20, "local")
    sizes = count_transactions(jobs, monkeypatch)
    statuses = await asyncio.gather(*(jobs.finish(j.task_id, Outcome(JobStatus.DONE, result={})) for j in claimed))
    assert statuses == [JobStatus.DONE] * 20
    assert sizes == [21]  # one transaction: the 20 outcomes and the load of their rows


async def test_an_error_reaches_only_its_caller(jobs: AsyncJobStore) -> None:
    await jobs.create([new("t1")])

    def boom(_b: Batch) -> None:
        raise RuntimeError("boom")

    ok, bad, ok2 = await asyncio.gather(
        jobs.create([new("t2")]), jobs.call(boom), jobs.backlog(), return_exceptions=True
    )
    assert ok == ["t2"] and isinstance(bad, RuntimeError) and ok2 == 2


async def test_written_events_are_handed_over_before_callers_resume(jobs: AsyncJobStore) -> None:
    handed: list[int] = []
    jobs.on_written = lambda rows: handed.extend(p.id for p in rows)
    created = await jobs.create([new("t1"), new("t2")])
    assert created == ["t1", "t2"] and len(handed) == 2  # their queued states, already in hand


async def test_a_lingering_operation_rides_with_the_next_one(
    jobs: AsyncJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_module, "LINGER_S", 5.0)
    await jobs.create([new("t1")])
    await jobs.claim(1, "local")
    sizes = count_transactions(jobs, monkeypatch)
    jobs.submitted_later("t1", "local:1", "/w", True, "running")
    await asyncio.sleep(0.05)
    assert sizes == []  # nothing committed for it alone
    assert await jobs.finish("t1", Outcome(JobStatus.DONE, result={})) is JobStatus.DONE
    assert sizes == [3]  # the load of the rows, the start and the outcome
    assert [t.state for t in jobs.store.transitions("t1")] == ["queued", "running", "done"]


async def test_a_lingering_operation_is_committed_on_its_own_in_time(
    jobs: AsyncJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_module, "LINGER_S", 0.05)
    await jobs.create([new("t1")])
    await jobs.claim(1, "local")
    jobs.submitted_later("t1", "local:1", "/w", True, "running")
    for _ in range(100):
        job = jobs.store.get("t1")
        if job is not None and job.status is JobStatus.RUNNING:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the lingering start was never committed")


async def test_close_commits_what_lingers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "LINGER_S", 60.0)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    jobs = await AsyncJobStore.open(url, "hpc", Topics())
    await jobs.create([new("t1")])
    await jobs.claim(1, "local")
    jobs.submitted_later("t1", "local:1", "/w", True, "running")
    await jobs.close()
    store = JobStore(url, "hpc", Topics())
    try:
        job = store.get("t1")
        assert job is not None and job.status is JobStatus.RUNNING and job.native_id == "local:1"
    finally:
        store.close()
