"""Scheduler and runner against a stand-in engine: room at the engine, claims ahead, recovery, cancel in waiting."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.engines.base import Engine, Execution
from reflexarc.hpc_bridge.registry import resolve_apps
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.runner import Runner
from reflexarc.hpc_bridge.service.scheduler import EngineRoom, Scheduler
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import NewJob, Outcome
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.topics import Topics


class StandIn(Engine):
    """Runs nothing: each attempt ends when the test lets it (a unit test's engine)."""

    name = "stand-in"

    def __init__(self, capacity: int, prefetch: int) -> None:
        self._capacity = capacity
        self.prefetch = prefetch
        self.at_once = 0
        self.most_at_once = 0
        self.submitted: list[str] = []
        self.go = asyncio.Event()

    @property
    def capacity(self) -> int:
        return self._capacity

    async def submit(self, spec: RunSpec) -> Execution:
        self.submitted.append(spec.task_id)
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        return _Attempt(self, spec)


class _Attempt(Execution):
    def __init__(self, engine: StandIn, spec: RunSpec) -> None:
        self.engine = engine
        self.spec = spec
        self.native_id = f"stand-in:{spec.task_id}"

    async def wait(self) -> Outcome:
        try:
            await self.engine.go.wait()
            await asyncio.sleep(0)
            return Outcome(JobStatus.DONE, result={"task": self.spec.task_id})
        finally:
            self.engine.at_once -= 1

    async def cancel(self) -> None:
        pass


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[SiteConfig, AsyncJobStore]]:
    cfg = SiteConfig.model_validate(
        {
            "site": "hpc",
            "state_dir": str(tmp_path / "state"),
            "apps": {"echo": {"function": "reflexarc.hpc_bridge.examples.apps:echo"}},
        }
    )
    jobs = await AsyncJobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}", "hpc", Topics())
    yield cfg, jobs
    await jobs.close()


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` is true (the loops under test run on this event loop)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_room_at_the_engine_and_claims_ahead(site: tuple[SiteConfig, AsyncJobStore]) -> None:
    cfg, jobs = site
    engine = StandIn(capacity=2, prefetch=1)
    runner = Runner(cfg, resolve_apps(cfg), engine, jobs, None)
    scheduler = Scheduler("hpc", engine, jobs, runner, lookahead=4)
    runner.on_queued = scheduler.wake
    await jobs.create([NewJob(TaskRequest(task_id=f"t{i}", app="echo", site="hpc")) for i in range(40)])
    loop = asyncio.create_task(scheduler.run())
    try:
        await until(lambda: scheduler.attempts == 3 + 4)
        assert engine.at_once == 3 and len(engine.submitted) == 3  # capacity + prefetch at the engine
        assert await jobs.backlog() == 40 - 7  # 4 more claimed ahead, ready and waiting
        engine.go.set()
        await until(lambda: jobs.store.counts() == {"done": 40})
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert engine.most_at_once == 3
    assert [t.state for t in jobs.store.transitions("t7")] == ["queued", "running", "done"]


async def test_an_outcome_found_on_disk_is_recorded_not_run_again(site: tuple[SiteConfig, AsyncJobStore]) -> None:
    cfg, jobs = site
    engine = StandIn(capacity=2, prefetch=0)
    runner = Runner(cfg, resolve_apps(cfg), engine, jobs, None)
    await jobs.create([NewJob(TaskRequest(task_id="t1", app="echo", site="hpc"))])
    (job,) = await jobs.claim(1, "stand-in")
    # A previous agent process ran it and was killed before recording the outcome.
    os.makedirs(runner.workdir(job))
    Path(runner.outcome_path(job)).write_text(json.dumps({"ok": True, "result": {"x": 1}}))
    await Scheduler("hpc", engine, jobs, runner).recover()
    await until(lambda: jobs.store.counts() == {"done": 1})
    assert engine.submitted == []


async def test_cancel_while_waiting_for_room_never_starts_it(site: tuple[SiteConfig, AsyncJobStore]) -> None:
    cfg, jobs = site
    engine = StandIn(capacity=1, prefetch=0)
    runner = Runner(cfg, resolve_apps(cfg), engine, jobs, None)
    scheduler = Scheduler("hpc", engine, jobs, runner, lookahead=2)
    await jobs.create([NewJob(TaskRequest(task_id=t, app="echo", site="hpc")) for t in ("a", "b")])
    loop = asyncio.create_task(scheduler.run())
    try:
        await until(lambda: scheduler.attempts == 2)
        assert engine.submitted == ["a"] and runner.has("b")
        assert await runner.cancel("b", "cancelled by user (test)")
        engine.go.set()
        await until(lambda: jobs.store.counts() == {"done": 1, "cancelled": 1})
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert engine.submitted == ["a"]
    b = jobs.store.get("b")
    assert b is not None and b.error == "cancelled by user (test)"


async def test_engine_room_is_first_come_first_served_and_follows_its_limit() -> None:
    limit = 1
    room = EngineRoom(lambda: limit)
    await room.enter()
    order: list[int] = []

    async def wait(i: int) -> None:
        await room.enter()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    cancelled = waiters.pop(1)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    limit = 3  # e.g. a pilot engine got another allocation
    room.admit()
    await asyncio.gather(*waiters)
    assert order == [0, 2] and room.held == 3
    room.leave()
    assert room.held == 2
