"""The job state machine: states, legal transitions and failure policies.

::

    created ──▶ queued ──▶ running ──▶ done
       │          │          ├──────▶ failed ──(retry)──▶ queued
       │          │          ├──────▶ timed_out ─(retry)─▶ queued
       └──────────┴──────────┴──────▶ cancelled

``created`` means recorded but waiting (for dependencies); ``queued`` means
ready and waiting for an engine slot; a retry moves a failed or timed-out job
back to ``queued``. ``jobs retry`` may also re-queue a cancelled job.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """States of a job."""

    CREATED = "created"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the end states (a result has been or will be published)."""
        return self in FINISHED


FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.CREATED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.DONE: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.TIMED_OUT: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
}


class TransitionError(ValueError):
    """A state change the state machine does not allow."""


def check_transition(old: JobStatus | None, new: JobStatus) -> None:
    """Raise :class:`TransitionError` unless ``old -> new`` is legal (``None`` = new job)."""
    if old is None:
        if new not in (JobStatus.CREATED, JobStatus.QUEUED, JobStatus.FAILED):
            raise TransitionError(f"a new job cannot start in state {new}")
        return
    if new not in _ALLOWED[old]:
        allowed = ", ".join(sorted(_ALLOWED[old])) or "nothing (it is final)"
        raise TransitionError(f"cannot move a job from {old} to {new}; from {old} it may go to {allowed}")


class OnFailure(StrEnum):
    """What happens when a task has failed and has no retries left (PyCOMPSs' on_failure).

    * ``retry`` (default): retry ``retries`` times (at least once), then cancel successors.
    * ``ignore``: report the failure, but run the successors as if it had succeeded.
    * ``cancel_successors``: no retry; cancel every task that depends on it (transitively).
    * ``fail``: no retry; mark every task that depends on it (transitively) failed.
    """

    RETRY = "retry"
    IGNORE = "ignore"
    CANCEL_SUCCESSORS = "cancel_successors"
    FAIL = "fail"
