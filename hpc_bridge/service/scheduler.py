"""The scheduler: claims queued jobs ahead of the engine and starts one attempt for each.

Two limits, both read from the engine each time (a pilot engine's capacity
changes with its allocations):

* **at the engine**: ``capacity + prefetch`` attempts hold a place there
  (:class:`EngineRoom`), from just before ``submit`` until the engine gives
  the outcome back, not until the outcome is committed;
* **claimed ahead**: up to ``lookahead`` more attempts are claimed and ready
  (run spec built, machine and environment found), waiting for a place. A
  claim is a database round trip (a commit costs milliseconds), so without
  them the engine would wait for the database after every task.

Claims are made when new jobs were recorded (at once: a single triggered
task must not wait), when half of the look-ahead has been used, or every
second. Before attempts start, their outcome files are looked for (on the
store's thread, with the claim): an attempt that finished while no agent was
watching is recorded, never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from reflexarc.hpc_bridge.engines import Engine
from reflexarc.hpc_bridge.metrics import TASKS_RUNNING
from reflexarc.hpc_bridge.service import nap
from reflexarc.hpc_bridge.service.jobs import AsyncJobStore
from reflexarc.hpc_bridge.service.runner import Runner
from reflexarc.hpc_bridge.store import JobView

log = logging.getLogger(__name__)

_Attempt = tuple[str, int]  # (task id, attempt number)


class EngineRoom:
    """Places at the engine, first come first served, up to a limit that may change."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        """Wait for a place (and take it)."""
        if self.held < self.limit() and not self._waiters:
            self.held += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()  # the place was handed over just as the waiter was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def leave(self) -> None:
        """Give a place back."""
        self.held -= 1
        self.admit()

    def admit(self) -> None:
        """Hand free places to waiters (also after the limit grew)."""
        while self._waiters and self.held < self.limit():
            fut = self._waiters.popleft()
            if not fut.done():
                self.held += 1
                fut.set_result(None)


class _Slot:
    """One attempt's place (see :class:`~reflexarc.hpc_bridge.service.runner.Slot`)."""

    def __init__(self, room: EngineRoom, done: Callable[[], None]) -> None:
        self._room = room
        self._done = done
        self.held = False
        self.finished = False

    async def take(self) -> None:
        await self._room.enter()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._room.leave()
        if not self.finished:
            self.finished = True
            self._done()


class Scheduler:
    """Dispatches queued jobs to :class:`Runner` attempts (one service loop: :meth:`run`)."""

    def __init__(
        self, site: str, engine: Engine, jobs: AsyncJobStore, runner: Runner, lookahead: int | None = None
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.runner = runner
        self.room = EngineRoom(lambda: max(1, engine.capacity + engine.prefetch))
        # Enough ready attempts to cover a few database round trips at the engine's pace.
        self.lookahead = lookahead if lookahead is not None else max(16, engine.capacity + engine.prefetch)
        self._wake = asyncio.Event()
        self._new = True  # jobs may be queued that no claim has seen
        self._attempts: dict[_Attempt, tuple[asyncio.Task[None], _Slot]] = {}
        self._ahead: set[_Attempt] = set()  # claimed, and not yet given back by the engine
        self._gauge = TASKS_RUNNING.labels(site)

    def wake(self) -> None:
        """New jobs were queued: claim now."""
        self._new = True
        self._wake.set()

    @property
    def attempts(self) -> int:
        """Attempts in progress (waiting, at the engine, or recording their outcome)."""
        return len(self._attempts)

    async def recover(self) -> None:
        """Pick up what a previous agent process left in flight."""
        started = await self.jobs.call(lambda b: self._with_outcomes(b.in_flight()))
        if started:
            log.info("recovering %d job(s) that were in flight when the agent last stopped", len(started))
        for job, earlier in started:
            self._spawn(job, True, earlier)

    async def run(self) -> None:
        """Claim and start until cancelled."""
        while True:
            await nap(self._wake, 1.0)
            timer = not self._wake.is_set()
            self._wake.clear()
            self.room.admit()  # the engine's capacity may have grown
            limit = self.room.limit() + self.lookahead
            want = limit - len(self._ahead)
            if want <= 0 or not (self._new or timer or want >= limit // 2):
                continue
            self._new = False
            name = self.engine.name
            for job, earlier in await self.jobs.call(lambda b, n=want, e=name: self._with_outcomes(b.claim(n, e))):  # type: ignore[misc]  # mypy cannot type a lambda with default arguments
                self._spawn(job, False, earlier)

    def _with_outcomes(self, jobs: list[JobView]) -> list[tuple[JobView, dict[str, object] | None]]:
        # On the store's thread, in the claim's transaction: one thread hop for claim and files.
        return list(zip(jobs, self.runner.read_outcomes(jobs), strict=True))

    def _spawn(self, job: JobView, recovering: bool, earlier: dict[str, object] | None) -> None:
        key = (job.task_id, job.attempt)
        self._ahead.add(key)

        def freed() -> None:
            self._ahead.discard(key)
            self._wake.set()

        slot = _Slot(self.room, freed)

        def done(t: asyncio.Task[None]) -> None:
            self._attempts.pop(key, None)
            slot.give_back()
            self._gauge.set(len(self._attempts))
            if not t.cancelled() and t.exception() is not None:
                log.error("task %s: its attempt ended with an error: %r", job.task_id, t.exception())

        task = asyncio.create_task(self.runner.run(job, recovering, earlier, slot), name=f"job-{job.task_id}")
        self._attempts[key] = (task, slot)
        self._gauge.set(len(self._attempts))
        task.add_done_callback(done)

    async def drain(self, grace_s: float) -> None:
        """At a stop: attempts not started are dropped (claimed again at the next start), running
        ones get ``grace_s`` to end, except re-attachable ones, which are left running."""
        waiting = [t for t, slot in self._attempts.values() if not slot.held and not slot.finished]
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        running = [t for t, _ in self._attempts.values()]
        if not running:
            return
        if not self.engine.reattachable:
            _, pending = await asyncio.wait(running, timeout=grace_s)
        else:
            pending = set(running)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
