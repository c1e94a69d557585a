"""The ``local`` engine: a pool of long-lived worker processes on this machine.

Each worker is ``python worker.py serve`` speaking one JSON line per task, so
a packed environment simply gets workers started with its own interpreter,
a timed-out or cancelled task is stopped by killing its worker (the pool
starts a fresh one), and a worker that dies is reported with its signal
instead of hanging. Workers die with the agent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

from reflexarc.hpc_bridge import worker as worker_module
from reflexarc.hpc_bridge.engines.base import Engine, EngineError, Execution, outcome_from_worker
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.process import die_with_parent

log = logging.getLogger(__name__)

WORKER_PATH = worker_module.__file__
# Outcome lines carry inline results; let them be large.
_LINE_LIMIT = 256 * 1024 * 1024


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process, python: str) -> None:
        self.proc = proc
        self.python = python

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class LocalEngine(Engine):
    """Process pool of ``max_workers`` workers (per interpreter, reused across tasks)."""

    name = "local"

    def __init__(self, max_workers: int, python: str | None = None) -> None:
        self.max_workers = max_workers
        self.python = python or sys.executable
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = asyncio.Semaphore(max_workers)
        self._closed = False
        self.prefetch = 2 * max_workers

    @property
    def capacity(self) -> int:
        """One task per worker."""
        return self.max_workers

    async def _spawn(self, python: str) -> _Worker:
        try:
            proc = await asyncio.create_subprocess_exec(
                python, WORKER_PATH, "serve",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT, preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise EngineError(f"cannot start a worker with {python}: {exc}") from exc
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            raise EngineError(f"worker with {python} exited at start-up (code {proc.returncode}); see stderr")
        return _Worker(proc, python)

    async def _take(self, python: str) -> _Worker:
        await self._slots.acquire()
        try:
            for w in list(self._idle):
                if not w.alive:
                    self._idle.remove(w)
            for w in self._idle:
                if w.python == python:
                    self._idle.remove(w)
                    return w
            # Keep at most max_workers processes: retire an idle worker of another interpreter.
            if self._idle and len(self._idle) + len(self._busy) >= self.max_workers:
                old = self._idle.pop(0)
                old.kill()
            return await self._spawn(python)
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, w: _Worker, reuse: bool) -> None:
        self._busy.discard(w)
        if reuse and w.alive and not self._closed:
            self._idle.append(w)
        else:
            w.kill()
        self._slots.release()

    async def submit(self, spec: RunSpec) -> Execution:
        """Send the task to a free worker of the right interpreter (waits for a slot)."""
        w = await self._take(spec.python or self.python)
        self._busy.add(w)
        try:
            assert w.proc.stdin is not None
            w.proc.stdin.write(spec.to_json().encode() + b"\n")
            await w.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._give_back(w, reuse=False)
            raise EngineError(f"worker {w.proc.pid} died before taking the task: {exc}") from exc
        return _LocalExecution(self, w)

    async def close(self) -> None:
        """Kill every worker and reap it."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        for w in workers:
            w.kill()
        for w in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.proc.wait(), 5)
        self._idle.clear()
        self._busy.clear()


class _LocalExecution(Execution):
    def __init__(self, engine: LocalEngine, w: _Worker) -> None:
        self.engine = engine
        self.worker = w
        self.native_id = f"local:{w.proc.pid}"
        self._done = False
        self._cancelled = False

    async def wait(self) -> Outcome:
        w = self.worker
        assert w.proc.stdout is not None
        try:
            line = await w.proc.stdout.readline()
        except asyncio.CancelledError:
            self._finish(reuse=False)
            raise
        except ValueError as exc:  # a line over the limit
            self._finish(reuse=False)
            return Outcome(JobStatus.FAILED, error=f"worker answer could not be read: {exc}")
        if not line:
            code = await w.proc.wait()
            self._finish(reuse=False)
            if self._cancelled:
                return Outcome(JobStatus.CANCELLED, error="cancelled", retryable=False)
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            return Outcome(JobStatus.FAILED, error=f"worker process {w.proc.pid} died while running the task ({how})")
        self._finish(reuse=True)
        try:
            data = json.loads(line)
        except ValueError:
            return Outcome(JobStatus.FAILED, error=f"worker answered garbage: {line[:200]!r}")
        return outcome_from_worker(data)

    def _finish(self, reuse: bool) -> None:
        if not self._done:
            self._done = True
            self.engine._give_back(self.worker, reuse)

    async def cancel(self) -> None:
        self._cancelled = True
        self.worker.kill()
        self._finish(reuse=False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.worker.proc.wait(), 5)
