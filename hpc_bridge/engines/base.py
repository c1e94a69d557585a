"""The engine interface: submit a :class:`RunSpec`, get an :class:`Execution` to wait on or cancel."""

from __future__ import annotations

import abc
from datetime import datetime
from typing import Any

from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec


class EngineError(RuntimeError):
    """An engine could not start or could not take a task; the text says what to check."""


class Execution(abc.ABC):
    """One attempt of one task inside an engine."""

    #: The engine's own id (batch job id, Dask key, worker pid): kept to re-attach after a restart.
    native_id: str | None = None
    #: Where it runs, if known.
    machine: str | None = None

    @property
    def running(self) -> bool:
        """True once the task is executing (not merely accepted, e.g. pending in a batch queue)."""
        return True

    def note(self) -> str | None:
        """The engine's latest word on the task (e.g. why a batch job is pending)."""
        return None

    @abc.abstractmethod
    async def wait(self) -> Outcome:
        """Wait until the attempt ends; never raises for a failure of the app itself."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Stop the attempt (kill the process, cancel the future, scancel the job)."""


class Engine(abc.ABC):
    """Runs tasks somewhere."""

    name: str = "engine"
    #: Can a new agent process find an execution started by a previous one?
    reattachable: bool = False
    #: Jobs taken from the queue beyond ``capacity``, waiting in ``submit`` for a slot
    #: (keeps the pipeline full while the database records the previous ones).
    prefetch: int = 0

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """How many tasks it should be given at once."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start pools, clusters or executors."""

    @abc.abstractmethod
    async def submit(self, spec: RunSpec) -> Execution:
        """Hand one attempt to the engine."""

    async def attach(self, spec: RunSpec, native_id: str) -> Execution | None:
        """Find an execution a previous agent process started (``None``: it is lost)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop whatever :meth:`start` started."""


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def outcome_from_worker(data: dict[str, Any] | None, lost: str = "the worker wrote no outcome") -> Outcome:
    """Turn the worker's outcome record (see ``worker.py``) into an :class:`Outcome`."""
    if not data:
        return Outcome(JobStatus.FAILED, error=lost)
    machine = data.get("machine") or data.get("host")
    if data.get("ok"):
        return Outcome(
            JobStatus.DONE,
            result=data.get("result"),
            machine=machine,
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )
    return Outcome(
        JobStatus.FAILED,
        error=str(data.get("error") or "failed without a message"),
        machine=machine,
        started_at=_time(data.get("started_at")),
        finished_at=_time(data.get("finished_at")),
    )
