"""The job store as the agent's loops use it: asynchronous, always open, one transaction per moment.

Every operation of :class:`~reflexarc.hpc_bridge.store.JobStore` runs on one
dedicated thread (SQLite must not block the event loop). Operations asked
for while a transaction is being written are queued and all of them go into
the next one: a burst of requests recorded, slots claimed, attempts
started and outcomes recorded costs one commit (one fsync), not one each
(*group commit*). The queue is first in, first out, so an operation always
sees the effect of every operation asked for before it.

An operation nobody waits for may *linger* (:data:`LINGER_S` at most): it
rides along with the next transaction that someone waits for, instead of
costing a transaction of its own. The agent uses it for the start of an
attempt on an engine whose executions die with the agent anyway: the
outcome that follows a few milliseconds later then shares its transaction.

If a batch fails, its operations are applied again one per transaction, so
that the error reaches only the caller whose operation caused it.

The facade is created by :meth:`AsyncJobStore.open` and exists exactly as
long as the agent runs, so no loop ever has to ask whether the store is there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from reflexarc.envelope import utcnow
from reflexarc.hpc_bridge.metrics import DB_BATCH
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Batch, JobStore, JobView, NewJob, Outcome, Pending
from reflexarc.topics import Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long an operation nobody waits for may wait for company (seconds).
LINGER_S = 0.05


@dataclass(slots=True)
class _Call:
    """One queued operation: what to do, which job rows it reads, and who waits for it."""

    op: Callable[[Batch], Any]
    rows: tuple[str, ...]
    future: asyncio.Future[Any]


class AsyncJobStore:
    """Asynchronous operations on the site's job store, committed in batches (see the module doc)."""

    def __init__(self, store: JobStore, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self._pool = pool
        self._queue: list[_Call] = []
        self._committer: asyncio.Task[None] | None = None
        self._kick: asyncio.TimerHandle | None = None
        #: Told about every outbox row a batch wrote, after its commit and before any caller of the
        #: batch resumes (the outbox publisher takes them from memory instead of re-reading them).
        self.on_written: Callable[[list[Pending]], None] = lambda rows: None

    @classmethod
    async def open(cls, url: str, site: str, topics: Topics) -> AsyncJobStore:
        """Open (and create, if new) the store at ``url`` on its own thread."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="rx-site-db")
        try:
            store = await asyncio.get_running_loop().run_in_executor(pool, JobStore, url, site, topics)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(store, pool)

    async def close(self) -> None:
        """Finish what is queued, then release the database and the thread."""
        if self._queue:
            self._start()
        while self._committer is not None and not self._committer.done():
            await asyncio.shield(self._committer)
        await asyncio.get_running_loop().run_in_executor(self._pool, self.store.close)
        self._pool.shutdown(wait=True)

    # ---- the queue -------------------------------------------------------------------------------
    def call(self, op: Callable[[Batch], T], rows: Iterable[str] = (), linger: bool = False) -> asyncio.Future[T]:
        """Queue ``op`` for the next transaction; the future holds its result once committed.

        ``rows``: task ids whose rows ``op`` reads, loaded for the whole batch at once.
        ``linger``: no transaction is started for it before :data:`LINGER_S` (see the module doc).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Call(op, tuple(rows), fut))
        if not linger:
            self._start()
        elif self._kick is None:
            self._kick = loop.call_later(LINGER_S, self._start)
        return fut

    def call_later(self, op: Callable[[Batch], Any], rows: Iterable[str] = (), what: str = "") -> None:
        """Queue ``op`` to linger, without waiting for it; a failure is logged (later operations see it applied)."""

        def report(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.error("job store: %s failed: %s", what or "an operation", fut.exception())

        self.call(op, rows, linger=True).add_done_callback(report)

    def _start(self) -> None:
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit(), name="job-store")

    async def _commit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # Let the callers of this moment join the batch.
            await asyncio.sleep(0)
            calls, self._queue = self._queue, []
            DB_BATCH.labels(self.store.site).observe(len(calls))
            try:
                results, written = await loop.run_in_executor(self._pool, self._apply, calls)
            except Exception:
                # Find the culprit: each operation alone, so that only its caller gets the error.
                for c in calls:
                    try:
                        (result,), rows = await loop.run_in_executor(self._pool, self._apply, [c])
                    except Exception as exc:
                        if not c.future.done():
                            c.future.set_exception(exc)
                        continue
                    self._deliver(rows)
                    if not c.future.done():
                        c.future.set_result(result)
                continue
            self._deliver(written)
            for c, result in zip(calls, results, strict=True):
                if not c.future.done():  # its caller may have been cancelled meanwhile
                    c.future.set_result(result)

    def _apply(self, calls: Sequence[_Call]) -> tuple[list[Any], list[Pending]]:
        rows = [r for c in calls for r in c.rows]
        ops = [c.op for c in calls]
        if rows:
            results, written = self.store.run([lambda b: b.load(rows), *ops])
            return results[1:], written
        return self.store.run(ops)

    def _deliver(self, written: list[Pending]) -> None:
        if written:
            try:
                self.on_written(written)
            except Exception:
                log.exception("job store: the outbox publisher could not take new events")

    # ---- operations ----------------------------------------------------------------------------------
    async def create(self, jobs: list[NewJob]) -> list[str]:
        """Record new jobs (ids already known are skipped); the ids created."""
        return await self.create_soon(jobs)

    def create_soon(self, jobs: list[NewJob]) -> asyncio.Future[list[str]]:
        """:meth:`create`, queued at once: operations queued before the caller awaits it share its transaction."""
        return self.call(lambda b: b.create_jobs(jobs))

    async def claim(self, limit: int, engine: str) -> list[JobView]:
        """Take up to ``limit`` queued jobs for dispatch."""
        return await self.call(lambda b: b.claim(limit, engine))

    async def submitted(
        self, task_id: str, native_id: str | None, workdir: str, running: bool, reason: str, machine: str | None = None
    ) -> None:
        """The engine took the attempt: its native id (to re-attach after a restart) and why it waits."""
        await self.call(lambda b: b.submitted(task_id, native_id, workdir, running, reason, machine), (task_id,))

    def submitted_later(
        self, task_id: str, native_id: str | None, workdir: str, running: bool, reason: str, machine: str | None = None
    ) -> None:
        """:meth:`submitted`, lingering and not waited for (what is queued after it sees it applied).

        The transition keeps the time of this call.
        """
        at = utcnow()
        self.call_later(
            lambda b: b.submitted(task_id, native_id, workdir, running, reason, machine, at),
            (task_id,),
            f"recording that task {task_id} was submitted",
        )

    async def note(self, task_id: str, reason: str, running: bool = False, machine: str | None = None) -> None:
        """Update a job's reason (and move it to running when ``running``)."""
        await self.call(lambda b: b.note(task_id, reason, running, machine), (task_id,))

    async def finish(self, task_id: str, outcome: Outcome) -> JobStatus | None:
        """Record how an attempt ended; the state the job went to (``None``: it had ended already)."""
        return await self.call(lambda b: b.finish(task_id, outcome), (task_id,))

    async def requeue_lost(self, task_id: str, reason: str) -> None:
        """Queue again a job whose execution a crash lost (no retry is used)."""
        await self.call(lambda b: b.requeue_lost(task_id, reason), (task_id,))

    async def in_flight(self) -> list[JobView]:
        """Jobs handed to an engine and not finished."""
        return await self.call(lambda b: b.in_flight())

    async def cancel_requests(self) -> list[str]:
        """Ids of dispatched jobs a user asked to cancel."""
        return await self.call(lambda b: b.cancel_requests())

    async def backlog(self) -> int:
        """Jobs waiting (created, or queued and not dispatched)."""
        return await self.call(lambda b: b.backlog())

    async def outbox_page(
        self, published: list[int], limit: int, cached: Callable[[int], Pending | None], kind: str | None = None
    ) -> list[Pending]:
        """Mark ``published`` rows and read the next ``limit`` unpublished ones, oldest first (one transaction)."""

        def op(b: Batch) -> list[Pending]:
            b.mark_published(published)
            return b.pending_events(limit, kind, cached)

        return await self.call(op)

    async def mark_published(self, ids: list[int]) -> None:
        """Kafka acknowledged these outbox rows."""
        await self.call(lambda b: b.mark_published(ids))
