"""The ``local`` engine: a pool of long-lived worker processes on this machine.

Each worker is ``python worker.py serve`` speaking one JSON line per task, so
a packed environment simply gets workers started with its own interpreter,
a timed-out or cancelled task is stopped by killing its worker (the pool
starts a fresh one), and a worker that dies is reported with its signal
instead of hanging. Workers die with the agent (PR_SET_PDEATHSIG).

**Pipelined.** When every worker is busy, the next task's line is written to
a busy worker's pipe at once (``depth`` tasks per worker, 2 by default), as a
process pool feeds its call queue: the worker reads it the moment it answers
the previous one, instead of idling for a round trip through the agent's
event loop, and the agent's write does not have to wake a sleeping process.
:meth:`LocalEngine.submit` still returns only when the task has started (its
predecessor answered), so an attempt's timeout, its ``running`` state and
its cancellation mean what they meant: a task behind another is not running
yet. Should the worker die (or be killed to cancel the task ahead), the task
behind, which never started, is handed to another worker; a submit
cancelled while waiting leaves a marker that makes the worker skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import deque

from reflexarc.hpc_bridge import worker as worker_module
from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec, skip_marker
from reflexarc.process import die_with_parent

log = logging.getLogger(__name__)

WORKER_PATH = worker_module.__file__
# Outcome lines carry inline results; let them be large.
_LINE_LIMIT = 256 * 1024 * 1024


class _Worker:
    """One ``worker.py serve`` process and the answers it owes, oldest (the running task) first."""

    def __init__(self, proc: asyncio.subprocess.Process, python: str) -> None:
        self.proc = proc
        self.python = python
        #: One future per line written; each gets the answer line, or ``b""`` if the worker died first.
        self.owed: deque[asyncio.Future[bytes]] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.killed = False

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.killed

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def read(self, engine: LocalEngine) -> None:
        """Hand each answer line to the oldest owed future; at EOF (or a broken stream) fail the rest."""
        assert self.proc.stdout is not None
        try:
            while True:
                try:
                    line = await self.proc.stdout.readline()
                except ValueError as exc:
                    # A line over the limit: what follows cannot be trusted; the worker goes.
                    self.kill()
                    if self.owed:
                        fut = self.owed.popleft()
                        if not fut.done():
                            fut.set_exception(exc)
                    break
                if not line:
                    break
                if self.owed:
                    fut = self.owed.popleft()
                    if not fut.done():
                        fut.set_result(line)
                engine.wake()
        finally:
            with contextlib.suppress(Exception):
                await self.proc.wait()
            while self.owed:
                fut = self.owed.popleft()
                if not fut.done():
                    fut.set_result(b"")
            engine.wake()


def _call_off(spec: RunSpec) -> None:
    # A file create on a rare path (a submit cancelled while queued, i.e. the agent stopping).
    path = skip_marker(spec)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w"):
            pass


class LocalEngine(Engine):
    """Process pool of ``max_workers`` workers (per interpreter, reused across tasks), ``depth`` tasks each."""

    name = "local"

    def __init__(self, max_workers: int, python: str | None = None, depth: int = 2) -> None:
        self.max_workers = max_workers
        self.python = python or sys.executable
        self.depth = max(1, depth)
        self._workers: list[_Worker] = []
        self._spawning = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.prefetch = 2 * max_workers

    @property
    def capacity(self) -> int:
        """One running task per worker."""
        return self.max_workers

    async def _spawn(self, python: str) -> _Worker:
        try:
            proc = await asyncio.create_subprocess_exec(
                python,
                WORKER_PATH,
                "serve",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise EngineError(f"cannot start a worker with {python}: {exc}") from exc
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            raise EngineError(f"worker with {python} exited at start-up (code {proc.returncode}); see stderr")
        w = _Worker(proc, python)
        w.reader = asyncio.create_task(w.read(self), name=f"local-worker-{proc.pid}")
        return w

    def wake(self) -> None:
        """A worker answered or died: the submits waiting for room look again."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _pick(self, python: str) -> _Worker | str | None:
        """An idle worker, else ``"spawn"`` while the pool has room, else a busy worker to queue behind."""
        self._workers = [w for w in self._workers if w.alive]
        same = [w for w in self._workers if w.python == python]
        for w in same:
            if not w.owed:
                return w
        if len(self._workers) + self._spawning < self.max_workers:
            return "spawn"
        idle_other = [w for w in self._workers if w.python != python and not w.owed]
        if idle_other:
            # Keep at most max_workers processes: retire an idle worker of another interpreter.
            idle_other[0].kill()
            self._workers.remove(idle_other[0])
            return "spawn"
        behind = [w for w in same if len(w.owed) < self.depth]
        return min(behind, key=lambda w: len(w.owed)) if behind else None

    async def _take(self, python: str) -> _Worker:
        while True:
            if self._closed:
                raise EngineError("the local engine is closed")
            picked = self._pick(python)
            if isinstance(picked, _Worker):
                return picked
            if picked == "spawn":
                self._spawning += 1
                try:
                    w = await self._spawn(python)
                finally:
                    self._spawning -= 1
                self._workers.append(w)
                return w
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    async def submit(self, spec: RunSpec) -> Execution:
        """Write the task to a worker (idle, or busy: it runs next there); return once it has started."""
        line = spec.to_json().encode() + b"\n"
        loop = asyncio.get_running_loop()
        while True:
            w = await self._take(spec.python or self.python)
            ahead = w.owed[-1] if w.owed else None
            answer: asyncio.Future[bytes] = loop.create_future()
            w.owed.append(answer)
            try:
                assert w.proc.stdin is not None
                w.proc.stdin.write(line)
                await w.proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                with contextlib.suppress(ValueError):
                    w.owed.remove(answer)
                w.kill()
                if ahead is not None:
                    continue  # it died under the task ahead: another worker takes this one
                raise EngineError(f"worker {w.proc.pid} died before taking the task: {exc}") from exc
            if ahead is None:
                return _LocalExecution(self, w, answer)
            try:
                # The task ahead answers: this one starts now (its line is the next the worker reads).
                ended = await asyncio.shield(ahead)
            except asyncio.CancelledError:
                # Not started: the worker is told to skip it when it gets there. Its answer stays owed
                # (nobody reads it), so a task queued behind it starts once the worker has skipped it.
                # Should the task ahead have ended this very moment, it may have started: its outcome
                # file then tells a restarted agent, as for any task in flight.
                _call_off(spec)
                raise
            except Exception:  # the answer ahead was unreadable: its worker is gone
                ended = b""
            if ended:
                return _LocalExecution(self, w, answer)
            # The worker died (or was killed to cancel the task ahead) before reading this line.
            answer.cancel()

    async def close(self) -> None:
        """Kill every worker and reap it."""
        self._closed = True
        self.wake()
        workers, self._workers = self._workers, []
        for w in workers:
            w.kill()
        for w in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.proc.wait(), 5)
            if w.reader is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(w.reader, 5)


class _LocalExecution(Execution):
    def __init__(self, engine: LocalEngine, w: _Worker, answer: asyncio.Future[bytes]) -> None:
        self.engine = engine
        self.worker = w
        self.answer = answer
        self.native_id = f"local:{w.proc.pid}"
        self._cancelled = False

    async def wait(self) -> Outcome:
        w = self.worker
        try:
            line = await asyncio.shield(self.answer)
        except asyncio.CancelledError:
            if self.answer.cancelled():
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False)
            w.kill()  # nobody will read its answer: the worker is not reused
            raise
        except ValueError as exc:  # a line over the limit
            return Outcome(JobStatus.FAILED, error=f"worker answer could not be read: {exc}")
        if not line:
            code = await w.proc.wait()
            if self._cancelled:
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False)
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            return Outcome(JobStatus.FAILED, error=f"worker process {w.proc.pid} died while running the task ({how})")
        try:
            data = json.loads(line)
        except ValueError:
            return Outcome(JobStatus.FAILED, error=f"worker answered garbage: {line[:200]!r}")
        return outcome_from_worker(data)

    async def cancel(self) -> None:
        self._cancelled = True
        self.worker.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.worker.proc.wait(), 5)
