"""The job database: every job, every transition with its reason, and an outbox of events.

SQLAlchemy 2.0, SQLite by default (WAL, one writer), PostgreSQL by URL. Each
state change is one transaction that writes the job row, a transition row and
the :class:`~reflexarc.events.JobState` event to publish (an *outbox*), so an
event can never be lost between the database and Kafka: the agent publishes
outbox rows and marks them published only after Kafka acknowledged them.

All methods are synchronous; the site agent calls them from one dedicated
thread (``asyncio`` stays free) and the ``jobs`` CLI calls them directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from reflexarc.envelope import Envelope, utcnow
from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.hpc_bridge.states import FINISHED, JobStatus, OnFailure, check_transition
from reflexarc.topics import Topics


class Base(DeclarativeBase):
    """Declarative base of the job tables."""


class JobRow(Base):
    """One task at this site and where it stands."""

    __tablename__ = "rx_jobs"

    task_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    app: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    on_failure: Mapped[str] = mapped_column(String(32), default=OnFailure.RETRY.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    timeout_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    request: Mapped[str] = mapped_column(Text)
    depends_on: Mapped[str] = mapped_column(Text, default="[]")
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)
    native_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    engine: Mapped[str | None] = mapped_column(String(32), nullable=True)
    machine: Mapped[str | None] = mapped_column(String(200), nullable=True)
    workdir: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DependencyRow(Base):
    """``task_id`` waits for ``depends_on`` (an edge of the task DAG)."""

    __tablename__ = "rx_job_deps"

    task_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    depends_on: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)


class TransitionRow(Base):
    """One state change of one job, with the reason."""

    __tablename__ = "rx_job_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(200), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    previous: Mapped[str | None] = mapped_column(String(16), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxRow(Base):
    """An event waiting to be published to Kafka (or already published)."""

    __tablename__ = "rx_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # state | result
    event_id: Mapped[str] = mapped_column(String(300), index=True)
    topic: Mapped[str] = mapped_column(String(250))
    key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[str] = mapped_column(Text)  # structured CloudEvent JSON
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def aware(dt: datetime | None) -> datetime | None:
    """SQLite forgets time zones; every stored time is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


@dataclass(frozen=True)
class JobView:
    """A read-only snapshot of a job (safe to pass between threads)."""

    task_id: str
    app: str
    status: JobStatus
    reason: str
    attempt: int
    max_retries: int
    on_failure: OnFailure
    priority: int
    timeout_s: float | None
    request: TaskRequest
    depends_on: list[str]
    dispatched: bool
    native_id: str | None
    engine: str | None
    machine: str | None
    workdir: str | None
    cancel_requested: bool
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: JobRow) -> JobView:
        """Snapshot of a row."""
        return cls(
            task_id=row.task_id, app=row.app, status=JobStatus(row.status), reason=row.reason,
            attempt=row.attempt, max_retries=row.max_retries, on_failure=OnFailure(row.on_failure),
            priority=row.priority, timeout_s=row.timeout_s,
            request=TaskRequest.model_validate_json(row.request), depends_on=json.loads(row.depends_on),
            dispatched=row.dispatched, native_id=row.native_id, engine=row.engine, machine=row.machine,
            workdir=row.workdir, cancel_requested=row.cancel_requested, error=row.error,
            created_at=aware(row.created_at),  # type: ignore[arg-type]
            updated_at=aware(row.updated_at),  # type: ignore[arg-type]
            started_at=aware(row.started_at), finished_at=aware(row.finished_at),
        )


@dataclass(frozen=True)
class NewJob:
    """A job to record: the request and what the site decided about its app."""

    request: TaskRequest
    max_retries: int = 0
    on_failure: OnFailure = OnFailure.RETRY
    timeout_s: float | None = None
    reject: str | None = None  # recorded straight as failed, with this error


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as an engine saw it."""

    status: JobStatus  # done | failed | timed_out | cancelled
    result: dict[str, Any] | None = None
    result_ref: str | None = None
    error: str | None = None
    machine: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retryable: bool = True  # False: no retry whatever the policy (e.g. cancelled by a user)


@dataclass(frozen=True)
class Pending:
    """An outbox row to publish."""

    id: int
    kind: str
    event_id: str
    topic: str
    key: bytes
    envelope: Envelope


class JobStore:
    """The job table and its state machine for one site."""

    def __init__(self, url: str, site: str, topics: Topics) -> None:
        self.site = site
        self.topics = topics
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        for attempt in range(10):
            try:
                Base.metadata.create_all(self.engine)
                break
            except OperationalError:
                # Another process (agent or CLI) is creating the tables at the same moment.
                if attempt == 9:
                    raise
                time.sleep(0.1)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # ---- events ----------------------------------------------------------------------
    def _outbox(self, s: Session, kind: str, env: Envelope, topic: str, key: str) -> None:
        s.add(
            OutboxRow(kind=kind, event_id=env.id, topic=topic, key=key,
                      payload=env.to_json().decode(), created_at=utcnow())
        )

    def _move(self, s: Session, row: JobRow, new: JobStatus, reason: str) -> None:
        old = JobStatus(row.status) if row.seq else None
        check_transition(old, new)
        now = utcnow()
        row.status = new.value
        row.reason = reason
        row.seq += 1
        row.updated_at = now
        if new is JobStatus.RUNNING:
            row.started_at = now
        if new in FINISHED:
            row.finished_at = now
        if new is JobStatus.QUEUED:
            row.dispatched = False
            row.native_id = None
            row.cancel_requested = False
        attempt = max(row.attempt, 1)
        s.add(TransitionRow(task_id=row.task_id, seq=row.seq, previous=old.value if old else None,
                            state=new.value, reason=reason, attempt=attempt, at=now))
        st = JobState(task_id=row.task_id, site=self.site, state=new.value,
                      previous=old.value if old else None, reason=reason, seq=row.seq,
                      attempt=attempt, at=now, machine=row.machine)
        self._outbox(s, "state", st.to_envelope(), self.topics.kafka_jobs, row.task_id)
        if new not in FINISHED and old is not None:
            # Jobs waiting on this one show its current state in their reason.
            s.flush()
            self._resolve(s, self._successors(s, [row.task_id]))

    def _result(self, s: Session, row: JobRow, outcome: Outcome) -> None:
        req = TaskRequest.model_validate_json(row.request)
        res = TaskResult(
            task_id=row.task_id, app=row.app, site=self.site, status=outcome.status.value,  # type: ignore[arg-type]
            result=outcome.result if outcome.status is JobStatus.DONE else None,
            result_ref=outcome.result_ref if outcome.status is JobStatus.DONE else None,
            error=outcome.error, attempts=max(row.attempt, 1), trigger=req.trigger, cause=req.cause,
            started_at=outcome.started_at or aware(row.started_at),
            finished_at=outcome.finished_at or utcnow(), machine=outcome.machine or row.machine,
        )
        self._outbox(s, "result", res.to_envelope(), self.topics.kafka_results, row.task_id)

    # ---- intake ----------------------------------------------------------------------
    def create_jobs(self, jobs: Iterable[NewJob]) -> list[str]:
        """Record new jobs in one transaction; ids already known are skipped. Returns created ids."""
        created: list[str] = []
        with self._tx() as s:
            batch = list(jobs)
            ids = [j.request.task_id for j in batch]
            known = set(s.scalars(select(JobRow.task_id).where(JobRow.task_id.in_(ids))))
            for j in batch:
                req = j.request
                if req.task_id in known:
                    continue
                known.add(req.task_id)
                now = utcnow()
                row = JobRow(
                    task_id=req.task_id, site=self.site, app=req.app, status=JobStatus.CREATED.value,
                    reason="", attempt=0, max_retries=j.max_retries, on_failure=j.on_failure.value,
                    priority=req.priority, timeout_s=j.timeout_s, request=req.model_dump_json(),
                    depends_on=json.dumps(req.depends_on), dispatched=False, cancel_requested=False,
                    seq=0, created_at=now, updated_at=now,
                )
                s.add(row)
                for dep in dict.fromkeys(req.depends_on):
                    s.add(DependencyRow(task_id=req.task_id, depends_on=dep))
                if j.reject is not None:
                    row.error = j.reject
                    self._move(s, row, JobStatus.FAILED, j.reject)
                    self._result(s, row, Outcome(JobStatus.FAILED, error=j.reject))
                elif req.depends_on:
                    self._move(s, row, JobStatus.CREATED,
                               f"waiting for {len(req.depends_on)} dependenc{'y' if len(req.depends_on) == 1 else 'ies'}")
                else:
                    self._move(s, row, JobStatus.QUEUED, "received; waiting for a free slot")
                created.append(req.task_id)
            s.flush()
            waiting = {j.request.task_id for j in batch if j.request.depends_on and j.request.task_id in created}
            self._resolve(s, waiting | self._successors(s, created))
        return created

    # ---- dependencies ------------------------------------------------------------------
    def _successors(self, s: Session, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        if not ids:
            return set()
        return set(s.scalars(select(DependencyRow.task_id).where(DependencyRow.depends_on.in_(ids))))

    def _resolve(self, s: Session, frontier: set[str]) -> None:
        """Promote, cancel or fail waiting jobs in ``frontier`` per their dependencies, cascading."""
        while frontier:
            ended: list[str] = []
            rows = s.scalars(
                select(JobRow).where(JobRow.task_id.in_(frontier), JobRow.status == JobStatus.CREATED.value)
            ).all()
            for row in rows:
                deps = json.loads(row.depends_on)
                dep_rows = {d.task_id: d for d in s.scalars(select(JobRow).where(JobRow.task_id.in_(deps)))}
                new, reason = _dependency_verdict(deps, dep_rows)
                if new is JobStatus.QUEUED:
                    self._move(s, row, new, reason)
                elif new is JobStatus.CREATED:
                    if row.reason != reason:
                        row.reason = reason  # a more precise waiting reason, not a transition
                else:
                    row.error = reason
                    if new is JobStatus.FAILED:
                        # 'fail' propagates: this job's own successors fail too.
                        row.on_failure = OnFailure.FAIL.value
                    self._move(s, row, new, reason)
                    self._result(s, row, Outcome(new, error=reason))
                    ended.append(row.task_id)
            s.flush()
            frontier = self._successors(s, ended)

    # ---- dispatch ----------------------------------------------------------------------
    def claim(self, limit: int, engine: str) -> list[JobView]:
        """Take up to ``limit`` queued jobs for dispatch (highest priority, oldest first)."""
        if limit <= 0:
            return []
        with self._tx() as s:
            rows = s.scalars(
                select(JobRow)
                .where(JobRow.status == JobStatus.QUEUED.value, JobRow.dispatched.is_(False))
                .order_by(JobRow.priority.desc(), JobRow.created_at)
                .limit(limit)
            ).all()
            for row in rows:
                row.dispatched = True
                row.attempt += 1
                row.engine = engine
                row.updated_at = utcnow()
            return [JobView.of(r) for r in rows]

    def submitted(self, task_id: str, native_id: str | None, workdir: str, running: bool,
                  reason: str, machine: str | None = None) -> None:
        """The engine took the job: remember its native id (for re-attaching) and why it waits."""
        with self._tx() as s:
            self._submitted(s, task_id, native_id, workdir, running, reason, machine)

    def _submitted(self, s: Session, task_id: str, native_id: str | None, workdir: str, running: bool,
                   reason: str, machine: str | None) -> None:
        row = s.get(JobRow, task_id)
        if row is None or JobStatus(row.status).finished:
            return
        row.native_id = native_id
        row.workdir = workdir
        if machine:
            row.machine = machine
        if running and row.status == JobStatus.QUEUED.value:
            self._move(s, row, JobStatus.RUNNING, reason)
        else:
            row.reason = reason
            row.updated_at = utcnow()

    def submitted_many(self, items: list[tuple[str, str | None, str, bool, str, str | None]]) -> list[None]:
        """:meth:`submitted` for many jobs in one transaction (one commit, one fsync)."""
        with self._tx() as s:
            for task_id, native_id, workdir, running, reason, machine in items:
                self._submitted(s, task_id, native_id, workdir, running, reason, machine)
        return [None] * len(items)

    def finish_many(self, items: list[tuple[str, Outcome]]) -> list[JobStatus | None]:
        """:meth:`finish` for many jobs in one transaction."""
        with self._tx() as s:
            return [self._finish(s, task_id, outcome) for task_id, outcome in items]

    def note(self, task_id: str, reason: str, running: bool = False, machine: str | None = None) -> None:
        """Update the reason shown for a job (and move queued -> running when it starts)."""
        with self._tx() as s:
            row = s.get(JobRow, task_id)
            if row is None or JobStatus(row.status).finished:
                return
            if machine:
                row.machine = machine
            if running and row.status == JobStatus.QUEUED.value:
                self._move(s, row, JobStatus.RUNNING, reason)
            elif row.reason != reason:
                row.reason = reason
                row.updated_at = utcnow()

    def finish(self, task_id: str, outcome: Outcome) -> JobStatus | None:
        """Record how an attempt ended: a retry, or the end with its result and the policy's effects.

        Returns the state the job went to (``None`` if it had already finished:
        a late answer is ignored, so a task never gets two results).
        """
        with self._tx() as s:
            return self._finish(s, task_id, outcome)

    def _finish(self, s: Session, task_id: str, outcome: Outcome) -> JobStatus | None:
        row = s.get(JobRow, task_id)
        if row is None or JobStatus(row.status).finished:
            return None
        if outcome.machine:
            row.machine = outcome.machine
        if row.status == JobStatus.QUEUED.value:
            # It never reported running (e.g. it failed to start): record that it ran.
            self._move(s, row, JobStatus.RUNNING, "started")
        retries_used = max(row.attempt - 1, 0)
        if (
            outcome.status in (JobStatus.FAILED, JobStatus.TIMED_OUT)
            and outcome.retryable
            and retries_used < row.max_retries
        ):
            row.error = outcome.error
            self._move(s, row, outcome.status, outcome.error or str(outcome.status))
            self._move(
                s, row, JobStatus.QUEUED,
                f"retry {retries_used + 1} of {row.max_retries} after {outcome.status}: "
                f"{outcome.error or ''}".rstrip(": "),
            )
            return JobStatus.QUEUED
        row.error = outcome.error
        reason = "completed" if outcome.status is JobStatus.DONE else (outcome.error or str(outcome.status))
        if outcome.status is not JobStatus.DONE and row.max_retries and outcome.retryable:
            reason += f" (no retries left: {row.max_retries} used)"
        self._move(s, row, outcome.status, reason)
        self._result(s, row, outcome)
        s.flush()
        self._resolve(s, self._successors(s, [task_id]))
        return outcome.status

    def requeue_lost(self, task_id: str, reason: str) -> None:
        """Put a job whose execution was lost (agent crash) back in the queue; no retry is used."""
        with self._tx() as s:
            row = s.get(JobRow, task_id)
            if row is None or JobStatus(row.status).finished:
                return
            row.attempt = max(row.attempt - 1, 0)
            if row.status == JobStatus.QUEUED.value:
                row.dispatched = False
                row.native_id = None
                row.reason = reason
                row.updated_at = utcnow()
            else:
                self._move(s, row, JobStatus.QUEUED, reason)

    def in_flight(self) -> list[JobView]:
        """Jobs handed to an engine and not finished (to re-attach after a restart)."""
        with self._tx() as s:
            rows = s.scalars(
                select(JobRow).where(
                    (JobRow.status == JobStatus.RUNNING.value)
                    | ((JobRow.status == JobStatus.QUEUED.value) & JobRow.dispatched.is_(True))
                )
            ).all()
            return [JobView.of(r) for r in rows]

    # ---- user verbs ------------------------------------------------------------------------
    def request_cancel(self, task_id: str, reason: str = "cancelled by user") -> JobStatus:
        """Cancel: at once if the job has not been dispatched, else ask the agent to stop it."""
        with self._tx() as s:
            row = s.get(JobRow, task_id)
            if row is None:
                raise KeyError(task_id)
            status = JobStatus(row.status)
            if status.finished:
                return status
            if status is JobStatus.CREATED or (status is JobStatus.QUEUED and not row.dispatched):
                row.error = reason
                self._move(s, row, JobStatus.CANCELLED, reason)
                self._result(s, row, Outcome(JobStatus.CANCELLED, error=reason))
                s.flush()
                self._resolve(s, self._successors(s, [task_id]))
                return JobStatus.CANCELLED
            row.cancel_requested = True
            row.reason = f"cancel requested ({reason}); waiting for the site agent to stop it"
            return status

    def cancel_requests(self) -> list[str]:
        """Ids of dispatched jobs a user asked to cancel."""
        with self._tx() as s:
            return list(s.scalars(select(JobRow.task_id).where(JobRow.cancel_requested.is_(True))))

    def retry(self, task_id: str, reason: str = "retried by user") -> JobStatus:
        """Queue a failed, timed-out or cancelled job again."""
        with self._tx() as s:
            row = s.get(JobRow, task_id)
            if row is None:
                raise KeyError(task_id)
            self._move(s, row, JobStatus.QUEUED, reason)
            row.max_retries = max(row.max_retries, row.attempt)
            return JobStatus.QUEUED

    # ---- outbox ------------------------------------------------------------------------------
    def pending_events(self, limit: int = 500, kind: str | None = None) -> list[Pending]:
        """Outbox rows not yet published, oldest first."""
        with self._tx() as s:
            q = select(OutboxRow).where(OutboxRow.published.is_(False))
            if kind:
                q = q.where(OutboxRow.kind == kind)
            rows = s.scalars(q.order_by(OutboxRow.id).limit(limit)).all()
            return [
                Pending(r.id, r.kind, r.event_id, r.topic, r.key.encode(), Envelope.from_json(r.payload.encode()))
                for r in rows
            ]

    def mark_published(self, ids: list[int]) -> None:
        """Kafka acknowledged these outbox rows."""
        if not ids:
            return
        with self._tx() as s:
            s.execute(update(OutboxRow).where(OutboxRow.id.in_(ids)).values(published=True))

    # ---- queries -----------------------------------------------------------------------------
    def get(self, task_id: str) -> JobView | None:
        """One job, or ``None``."""
        with self._tx() as s:
            row = s.get(JobRow, task_id)
            return JobView.of(row) if row else None

    def transitions(self, task_id: str) -> list[TransitionRow]:
        """Every state change of a job, in order."""
        with self._tx() as s:
            rows = s.scalars(
                select(TransitionRow).where(TransitionRow.task_id == task_id).order_by(TransitionRow.seq)
            ).all()
            for r in rows:
                r.at = aware(r.at)  # type: ignore[assignment]
            return list(rows)

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[JobView]:
        """Most recently updated jobs first, optionally of one state."""
        with self._tx() as s:
            q = select(JobRow)
            if status:
                q = q.where(JobRow.status == status)
            rows = s.scalars(q.order_by(JobRow.updated_at.desc()).limit(limit)).all()
            return [JobView.of(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        with self._tx() as s:
            return {st: n for st, n in s.execute(select(JobRow.status, func.count()).group_by(JobRow.status))}

    def backlog(self) -> int:
        """Jobs waiting (created or queued, not dispatched)."""
        with self._tx() as s:
            return int(
                s.scalar(
                    select(func.count()).select_from(JobRow).where(
                        (JobRow.status == JobStatus.CREATED.value)
                        | ((JobRow.status == JobStatus.QUEUED.value) & JobRow.dispatched.is_(False))
                    )
                )
                or 0
            )


def _dependency_verdict(deps: list[str], rows: dict[str, JobRow]) -> tuple[JobStatus, str]:
    """What a waiting job should do given its dependencies' states."""
    missing = [d for d in deps if d not in rows]
    unfinished = [d for d, r in rows.items() if not JobStatus(r.status).finished]
    for d in deps:
        r = rows.get(d)
        if r is None or r.status == JobStatus.DONE.value or not JobStatus(r.status).finished:
            continue
        policy = OnFailure(r.on_failure)
        if policy is OnFailure.IGNORE:
            continue
        if policy is OnFailure.FAIL:
            return JobStatus.FAILED, f"dependency {d} ended {r.status} (its on_failure is 'fail')"
        return JobStatus.CANCELLED, f"dependency {d} ended {r.status} (its on_failure is '{policy}')"
    if missing:
        return JobStatus.CREATED, f"waiting for dependenc{'y' if len(missing) == 1 else 'ies'} " + ", ".join(
            missing[:5]
        ) + " (not received yet)"
    if unfinished:
        states = ", ".join(f"{d} ({rows[d].status})" for d in unfinished[:5])
        return JobStatus.CREATED, f"waiting for {states}"
    return JobStatus.QUEUED, "dependencies finished; waiting for a free slot"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the CLI read while the agent writes; synchronous=FULL keeps a
    # committed job durable through power loss, not only through a crash.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
