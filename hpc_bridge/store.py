"""The job database: every job, every transition with its reason, and an outbox of events.

SQLAlchemy 2.0, SQLite by default (WAL, one writer), PostgreSQL by URL. A
state change writes the job row, a transition row and the
:class:`~reflexarc.events.JobState` event to publish (an *outbox*) in the
same transaction, so an event can never be lost between the database and
Kafka: the agent publishes outbox rows and marks them published only after
Kafka acknowledged them.

Work is done in a :class:`Batch`: any number of operations (record requests,
claim jobs, record outcomes, mark events published, ...) in one transaction,
one commit, one fsync. The site agent gathers what its loops ask for at the
same moment into one batch (:mod:`reflexarc.hpc_bridge.service.jobs`); the
``jobs`` CLI runs one operation per batch. A batch reads each job row once,
applies the state machine in memory and writes with one statement per table
(``executemany``), because per-row ORM round trips cost milliseconds a task.

All methods are synchronous; the site agent calls them from one dedicated
thread (``asyncio`` stays free) and the ``jobs`` CLI calls them directly.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from reflexarc.envelope import Envelope, utcnow
from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.hpc_bridge.states import FINISHED, JobStatus, OnFailure, check_transition
from reflexarc.topics import Topics

T = TypeVar("T")


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


# Claims walk this index in their order instead of sorting every queued job (2.6 ms at 5,000 queued).
CLAIM_INDEX = Index("ix_rx_jobs_claim", JobRow.status, JobRow.dispatched, JobRow.priority.desc(), JobRow.created_at)


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


def utc(dt: datetime) -> datetime:
    """:func:`aware` of a time that is always there."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


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
    def of(cls, row: JobRow | _Job, request: TaskRequest | None = None) -> JobView:
        """Snapshot of a row (an ORM row or a batch's working copy); ``request``: the row's, already read."""
        return cls(
            task_id=row.task_id,
            app=row.app,
            status=JobStatus(row.status),
            reason=row.reason,
            attempt=row.attempt,
            max_retries=row.max_retries,
            on_failure=OnFailure(row.on_failure),
            priority=row.priority,
            timeout_s=row.timeout_s,
            request=request or TaskRequest.model_validate_json(row.request),
            depends_on=json.loads(row.depends_on),
            dispatched=row.dispatched,
            native_id=row.native_id,
            engine=row.engine,
            machine=row.machine,
            workdir=row.workdir,
            cancel_requested=row.cancel_requested,
            error=row.error,
            created_at=utc(row.created_at),
            updated_at=utc(row.updated_at),
            started_at=aware(row.started_at),
            finished_at=aware(row.finished_at),
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


_JOBS: Table = Base.metadata.tables[JobRow.__tablename__]
_DEPS: Table = Base.metadata.tables[DependencyRow.__tablename__]
_TRANSITIONS: Table = Base.metadata.tables[TransitionRow.__tablename__]
_OUTBOX: Table = Base.metadata.tables[OutboxRow.__tablename__]


@dataclass(slots=True)
class _Job:
    """A batch's working copy of one job row (plain attributes: cheap to read and change)."""

    task_id: str
    site: str
    app: str
    status: str
    reason: str
    attempt: int
    max_retries: int
    on_failure: str
    priority: int
    timeout_s: float | None
    request: str
    depends_on: str
    dispatched: bool
    native_id: str | None
    engine: str | None
    machine: str | None
    workdir: str | None
    cancel_requested: bool
    error: str | None
    seq: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


_JOB_FIELDS = tuple(f.name for f in fields(_Job))
# What a state change may alter; the rest of a row is fixed when the job is recorded.
_MUTABLE = (
    "status",
    "reason",
    "attempt",
    "max_retries",
    "on_failure",
    "dispatched",
    "native_id",
    "engine",
    "machine",
    "workdir",
    "cancel_requested",
    "error",
    "seq",
    "updated_at",
    "started_at",
    "finished_at",
)
# Requests held in memory at most (a few KiB each); beyond, they are read from their rows.
_REQUESTS_HELD = 10_000
_TRANSITION_FIELDS = ("task_id", "seq", "previous", "state", "reason", "attempt", "at")
_OUTBOX_FIELDS = ("id", "kind", "event_id", "topic", "key", "payload", "published", "created_at")
_J, _O = _JOBS.c, _OUTBOX.c
assert tuple(c.name for c in _JOBS.columns) == _JOB_FIELDS, "_Job mirrors rx_jobs column by column"


_UNSEEN = object()


def _converter(type_: Any, dialect: Dialect, way: str) -> Callable[[Any], Any] | None:
    """How SQLAlchemy converts values of ``type_`` for the driver (``bind``) or from it (``result``).

    Only times and booleans need it for the columns here (SQLite stores them as text and integers);
    every other value goes to and from the drivers as it is.
    """
    if not isinstance(type_, DateTime | Boolean):
        return None
    impl = type_.dialect_impl(dialect)
    fn: Callable[[Any], Any] | None = (
        impl.bind_processor(dialect) if way == "bind" else impl.result_processor(dialect, None)
    )
    return fn


class _Sql:
    """A statement compiled once for the database's dialect and run straight on the DBAPI cursor.

    The SQL text, the parameter style and the conversion of values (bind and result processors
    of the column types) are SQLAlchemy's, so rows are read and stored exactly as SQLAlchemy
    would. What is skipped is SQLAlchemy's work at every execution (tens of µs a statement and
    several a row), which the agent would otherwise pay hundreds of times a second.
    """

    def __init__(
        self,
        stmt: Any,
        dialect: Dialect,
        columns: Sequence[str] | None = None,
        *,
        records: str = "attrs",
        key: str | None = None,
    ) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        self._defaults = dict(compiled.params)  # values written in the statement (e.g. 'queued')
        self.names: list[str] = list(compiled.positiontup or []) if self.positional else list(self._defaults)
        types = {name: bind.type for bind, name in compiled.bind_names.items()}
        self._bind = {n: fn for n in self.names if (fn := _converter(types[n], dialect, "bind")) is not None}
        selected = getattr(stmt, "selected_columns", ())
        self._result = [
            (i, fn) for i, c in enumerate(selected) if (fn := _converter(c.type, dialect, "result")) is not None
        ]
        if columns is not None:
            # Rows to write: each record gives the value of every column (a WHERE ``key`` takes its task id).
            fields = ["task_id" if n == key else n for n in self.names]
            self._get = operator.attrgetter(*fields) if records == "attrs" else operator.itemgetter(*fields)
            self._convert = [(i, self._bind[n]) for i, n in enumerate(self.names) if n in self._bind]

    def _params(self, given: dict[str, Any]) -> Any:
        values = {**self._defaults, **given}
        for n, fn in self._bind.items():
            values[n] = fn(values[n])
        return tuple(values[n] for n in self.names) if self.positional else values

    def rows(self, cursor: Any, **params: Any) -> list[Any]:
        """Run it; the rows, converted (a list per row)."""
        cursor.execute(self.sql, self._params(params))
        rows = cursor.fetchall() if cursor.description else []
        if not self._result:
            return rows
        out = []
        for r in rows:
            values = list(r)
            for i, fn in self._result:
                values[i] = fn(values[i])
            out.append(values)
        return out

    def scalars(self, cursor: Any, **params: Any) -> list[Any]:
        """Run it; the first column of every row."""
        return [r[0] for r in self.rows(cursor, **params)]

    def write(self, cursor: Any, records: Iterable[Any]) -> None:
        """INSERT or UPDATE one row per record (``executemany``)."""
        params: list[Any] = []
        # The same time is often in several rows and columns (a move stamps its row and its transition).
        memo: list[dict[Any, Any]] = [{} for _ in self._convert]
        for r in records:
            values = list(self._get(r))
            for (i, fn), seen in zip(self._convert, memo, strict=True):
                v = values[i]
                c = seen.get(v, _UNSEEN)
                if c is _UNSEEN:
                    c = seen[v] = fn(v)
                values[i] = c
            params.append(tuple(values) if self.positional else dict(zip(self.names, values, strict=True)))
        cursor.executemany(self.sql, params)


class _Statements:
    """Every statement a batch runs, compiled for one database."""

    def __init__(self, dialect: Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"

        def among(column: Any) -> Any:
            # One parameter holds all the ids, so the statement's text never changes with their number.
            if self.sqlite:
                return column.in_(select(func.json_each(bindparam("ids")).table_valued("value").c.value))
            return column == func.any(bindparam("ids", type_=ARRAY(column.type)))

        queued, running, created = JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.CREATED.value
        # FOR UPDATE: on PostgreSQL no other writer changes these rows before the batch commits (a
        # SQLite batch holds the database's write lock from its first statement; it renders nothing).
        self.load = _Sql(select(_JOBS).where(among(_J.task_id)).with_for_update(), dialect)
        self.known = _Sql(select(_J.task_id).where(among(_J.task_id)), dialect)
        self.successors = _Sql(select(_DEPS.c.task_id).where(among(_DEPS.c.depends_on)), dialect)
        self.claim = _Sql(
            select(_JOBS)
            .where(_J.status == queued, _J.dispatched.is_(False))
            .order_by(_J.priority.desc(), _J.created_at)
            .limit(bindparam("n"))
            .with_for_update(),
            dialect,
        )
        self.in_flight = _Sql(
            select(_JOBS).where((_J.status == running) | ((_J.status == queued) & _J.dispatched.is_(True))), dialect
        )
        self.cancel_requests = _Sql(select(_J.task_id).where(_J.cancel_requested.is_(True)), dialect)
        self.backlog = _Sql(
            select(func.count())
            .select_from(_JOBS)
            .where((_J.status == created) | ((_J.status == queued) & _J.dispatched.is_(False))),
            dialect,
        )
        self.pending = _Sql(select(_O.id).where(_O.published.is_(False)).order_by(_O.id).limit(bindparam("n")), dialect)
        self.pending_of_kind = _Sql(
            select(_O.id)
            .where(_O.published.is_(False), _O.kind == bindparam("kind"))
            .order_by(_O.id)
            .limit(bindparam("n")),
            dialect,
        )
        self.outbox_rows = _Sql(
            select(_O.id, _O.kind, _O.event_id, _O.topic, _O.key, _O.payload).where(among(_O.id)), dialect
        )
        self.mark = _Sql(update(_OUTBOX).where(among(_O.id)).values(published=True), dialect)
        self.max_outbox_id = _Sql(select(func.coalesce(func.max(_O.id), 0)), dialect)
        self.oldest_pending = _Sql(
            select(_O.created_at).where(_O.published.is_(False)).order_by(_O.id).limit(1), dialect
        )
        self.insert_jobs = _Sql(insert(_JOBS), dialect, _JOB_FIELDS)
        self.update_jobs = _Sql(update(_JOBS).where(_J.task_id == bindparam("key")), dialect, _MUTABLE, key="key")
        self.insert_deps = _Sql(insert(_DEPS), dialect, ("task_id", "depends_on"), records="items")
        self.insert_transitions = _Sql(insert(_TRANSITIONS), dialect, _TRANSITION_FIELDS, records="items")
        self.insert_outbox = _Sql(insert(_OUTBOX), dialect, _OUTBOX_FIELDS, records="items")
        # SQLite batches hold the write lock from their start, so they can number outbox rows
        # themselves; elsewhere other writers may insert concurrently and the database gives the ids.
        self.database_gives_ids = not self.sqlite
        self.insert_outbox_returning = _Sql(
            insert(_OUTBOX).values({c: bindparam(c) for c in _OUTBOX_FIELDS[1:]}).returning(_O.id), dialect
        )

    def ids(self, ids: Sequence[Any]) -> Any:
        """The value of an ``ids`` parameter."""
        return json.dumps(list(ids)) if self.sqlite else list(ids)


class Batch:
    """Operations on the job table applied in one transaction (see :meth:`JobStore.run`).

    Rows are read once into working copies, changed in memory and written
    back at the end (or before a query that must see them). Dependencies are
    settled once per batch: every job that moved has its waiting successors
    re-evaluated, cascading. Outbox rows written are listed in :attr:`written`
    with their envelopes, so the agent publishes them without reading them back.
    """

    def __init__(
        self, cursor: Any, statements: _Statements, site: str, topics: Topics, requests: dict[str, TaskRequest]
    ) -> None:
        self._cur = cursor
        self._s = statements
        self._requests = requests
        self.site = site
        self.topics = topics
        self._rows: dict[str, _Job] = {}
        self._new: dict[str, _Job] = {}
        self._dirty: set[str] = set()
        self._new_deps: list[tuple[str, str]] = []
        self._transitions: list[dict[str, Any]] = []
        self._events: list[tuple[str, Envelope, str, str]] = []
        self._moved: set[str] = set()
        self._waiting: set[str] = set()
        #: Outbox rows this batch wrote, in order (valid once the transaction committed).
        self.written: list[Pending] = []

    # ---- rows ----------------------------------------------------------------------------------
    def _adopt(self, values: Sequence[Any]) -> _Job:
        """The working copy of a row just read (the batch's own copy wins: it may be newer)."""
        row = self._rows.get(values[0])
        if row is None:
            row = _Job(*values)
            self._rows[row.task_id] = row
        return row

    def load(self, task_ids: Iterable[str]) -> None:
        """Read the rows of ``task_ids`` that this batch has not read yet (one query)."""
        missing = [t for t in dict.fromkeys(task_ids) if t not in self._rows]
        if missing:
            for values in self._s.load.rows(self._cur, ids=self._s.ids(missing)):
                self._adopt(values)

    def _get(self, task_id: str) -> _Job | None:
        if task_id not in self._rows:
            self.load([task_id])
        return self._rows.get(task_id)

    def _touch(self, row: _Job) -> None:
        if row.task_id not in self._new:
            self._dirty.add(row.task_id)

    # ---- events ----------------------------------------------------------------------------------
    def _move(self, row: _Job, new: JobStatus, reason: str, at: datetime | None = None) -> None:
        old = JobStatus(row.status) if row.seq else None
        check_transition(old, new)
        now = at or utcnow()
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
        previous = old.value if old else None
        self._transitions.append(
            {
                "task_id": row.task_id,
                "seq": row.seq,
                "previous": previous,
                "state": new.value,
                "reason": reason,
                "attempt": attempt,
                "at": now,
            }
        )
        st = JobState(
            task_id=row.task_id,
            site=self.site,
            state=new.value,
            previous=previous,
            reason=reason,
            seq=row.seq,
            attempt=attempt,
            at=now,
            machine=row.machine,
        )
        self._events.append(("state", st.to_envelope(), self.topics.kafka_jobs, row.task_id))
        self._touch(row)
        # Jobs waiting on this one are re-evaluated (or show its new state in their reason).
        self._moved.add(row.task_id)

    def _request(self, row: _Job, ended: bool = False) -> TaskRequest:
        """The job's request: as it was recorded by this process, else read from the row."""
        req = self._requests.pop(row.task_id, None) if ended else self._requests.get(row.task_id)
        if req is None:
            req = TaskRequest.model_validate_json(row.request)
            if not ended and len(self._requests) < _REQUESTS_HELD:
                self._requests[row.task_id] = req
        return req

    def _result(self, row: _Job, outcome: Outcome) -> None:
        req = self._request(row, ended=True)
        done = outcome.status is JobStatus.DONE
        res = TaskResult(
            task_id=row.task_id,
            app=row.app,
            site=self.site,
            status=outcome.status.value,  # type: ignore[arg-type]  # a final JobStatus is a TaskResult status
            result=outcome.result if done else None,
            result_ref=outcome.result_ref if done else None,
            error=outcome.error,
            attempts=max(row.attempt, 1),
            trigger=req.trigger,
            cause=req.cause,
            started_at=outcome.started_at or aware(row.started_at),
            finished_at=outcome.finished_at or utcnow(),
            machine=outcome.machine or row.machine,
        )
        self._events.append(("result", res.to_envelope(), self.topics.kafka_results, row.task_id))

    # ---- intake ----------------------------------------------------------------------------------
    def create_jobs(self, jobs: Iterable[NewJob]) -> list[str]:
        """Record new jobs; ids already known are skipped. Returns the created ids."""
        batch = list(jobs)
        ids = list(dict.fromkeys(j.request.task_id for j in batch))
        known = {t for t in ids if t in self._rows}
        unknown = [t for t in ids if t not in known]
        if unknown:
            known.update(self._s.known.scalars(self._cur, ids=self._s.ids(unknown)))
        created: list[str] = []
        for j in batch:
            req = j.request
            if req.task_id in known:
                continue
            known.add(req.task_id)
            now = utcnow()
            row = _Job(
                task_id=req.task_id,
                site=self.site,
                app=req.app,
                status=JobStatus.CREATED.value,
                reason="",
                attempt=0,
                max_retries=j.max_retries,
                on_failure=j.on_failure.value,
                priority=req.priority,
                timeout_s=j.timeout_s,
                request=req.model_dump_json(),
                depends_on=json.dumps(req.depends_on),
                dispatched=False,
                native_id=None,
                engine=None,
                machine=None,
                workdir=None,
                cancel_requested=False,
                error=None,
                seq=0,
                created_at=now,
                updated_at=now,
                started_at=None,
                finished_at=None,
            )
            self._rows[req.task_id] = self._new[req.task_id] = row
            if len(self._requests) < _REQUESTS_HELD:
                self._requests[req.task_id] = req
            self._new_deps.extend((req.task_id, dep) for dep in dict.fromkeys(req.depends_on))
            if j.reject is not None:
                row.error = j.reject
                self._move(row, JobStatus.FAILED, j.reject)
                self._result(row, Outcome(JobStatus.FAILED, error=j.reject))
            elif req.depends_on:
                n = len(req.depends_on)
                self._move(row, JobStatus.CREATED, f"waiting for {n} dependenc{'y' if n == 1 else 'ies'}")
                self._waiting.add(req.task_id)
            else:
                self._move(row, JobStatus.QUEUED, "received; waiting for a free slot")
            created.append(req.task_id)
        return created

    # ---- dependencies ------------------------------------------------------------------------------
    def _successors(self, ids: set[str]) -> set[str]:
        found = {task for task, dep in self._new_deps if dep in ids}
        found.update(self._s.successors.scalars(self._cur, ids=self._s.ids(sorted(ids))))
        return found

    def _settle(self) -> None:
        """Promote, cancel or fail waiting jobs per their dependencies, cascading."""
        while self._moved or self._waiting:
            frontier = self._waiting | (self._successors(self._moved) if self._moved else set())
            self._moved, self._waiting = set(), set()
            self.load(frontier)
            for task_id in sorted(frontier):
                row = self._rows.get(task_id)
                if row is None or row.status != JobStatus.CREATED.value:
                    continue
                deps: list[str] = json.loads(row.depends_on)
                self.load(deps)
                new, reason = _dependency_verdict(deps, {d: self._rows[d] for d in deps if d in self._rows})
                if new is JobStatus.QUEUED:
                    self._move(row, new, reason)
                elif new is JobStatus.CREATED:
                    if row.reason != reason:
                        row.reason = reason  # a more precise waiting reason, not a transition
                        self._touch(row)
                else:
                    row.error = reason
                    if new is JobStatus.FAILED:
                        # 'fail' propagates: this job's own successors fail too.
                        row.on_failure = OnFailure.FAIL.value
                    self._move(row, new, reason)
                    self._result(row, Outcome(new, error=reason))

    # ---- dispatch ----------------------------------------------------------------------------------
    def claim(self, limit: int, engine: str) -> list[JobView]:
        """Take up to ``limit`` queued jobs for dispatch (highest priority, oldest first)."""
        if limit <= 0:
            return []
        self.sync()
        rows = [self._adopt(v) for v in self._s.claim.rows(self._cur, n=limit)]
        now = utcnow()
        for row in rows:
            row.dispatched = True
            row.attempt += 1
            row.engine = engine
            row.updated_at = now
            self._touch(row)
        return [JobView.of(r, self._request(r)) for r in rows]

    def submitted(
        self,
        task_id: str,
        native_id: str | None,
        workdir: str,
        running: bool,
        reason: str,
        machine: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """The engine took the job: remember its native id (for re-attaching) and why it waits (``at``: when)."""
        row = self._get(task_id)
        if row is None or JobStatus(row.status).finished:
            return
        row.native_id = native_id
        row.workdir = workdir
        if machine:
            row.machine = machine
        if running and row.status == JobStatus.QUEUED.value:
            self._move(row, JobStatus.RUNNING, reason, at)
        else:
            row.reason = reason
            row.updated_at = at or utcnow()
            self._touch(row)

    def note(self, task_id: str, reason: str, running: bool = False, machine: str | None = None) -> None:
        """Update the reason shown for a job (and move queued -> running when it starts)."""
        row = self._get(task_id)
        if row is None or JobStatus(row.status).finished:
            return
        if machine:
            row.machine = machine
            self._touch(row)
        if running and row.status == JobStatus.QUEUED.value:
            self._move(row, JobStatus.RUNNING, reason)
        elif row.reason != reason:
            row.reason = reason
            row.updated_at = utcnow()
            self._touch(row)

    def finish(self, task_id: str, outcome: Outcome) -> JobStatus | None:
        """Record how an attempt ended: a retry, or the end with its result and the policy's effects.

        Returns the state the job went to (``None`` if it had already finished:
        a late answer is ignored, so a task never gets two results).
        """
        row = self._get(task_id)
        if row is None or JobStatus(row.status).finished:
            return None
        if outcome.machine:
            row.machine = outcome.machine
        if row.status == JobStatus.QUEUED.value:
            # It never reported running (e.g. it failed to start): record that it ran.
            self._move(row, JobStatus.RUNNING, "started")
        retries_used = max(row.attempt - 1, 0)
        if (
            outcome.status in (JobStatus.FAILED, JobStatus.TIMED_OUT)
            and outcome.retryable
            and retries_used < row.max_retries
        ):
            row.error = outcome.error
            self._move(row, outcome.status, outcome.error or str(outcome.status))
            self._move(
                row,
                JobStatus.QUEUED,
                f"retry {retries_used + 1} of {row.max_retries} after {outcome.status}: {outcome.error or ''}".rstrip(
                    ": "
                ),
            )
            return JobStatus.QUEUED
        row.error = outcome.error
        reason = "completed" if outcome.status is JobStatus.DONE else (outcome.error or str(outcome.status))
        if outcome.status is not JobStatus.DONE and row.max_retries and outcome.retryable:
            reason += f" (no retries left: {row.max_retries} used)"
        self._move(row, outcome.status, reason)
        self._result(row, outcome)
        return outcome.status

    def requeue_lost(self, task_id: str, reason: str) -> None:
        """Put a job whose execution was lost (agent crash) back in the queue; no retry is used."""
        row = self._get(task_id)
        if row is None or JobStatus(row.status).finished:
            return
        row.attempt = max(row.attempt - 1, 0)
        if row.status == JobStatus.QUEUED.value:
            row.dispatched = False
            row.native_id = None
            row.reason = reason
            row.updated_at = utcnow()
            self._touch(row)
        else:
            self._move(row, JobStatus.QUEUED, reason)

    def in_flight(self) -> list[JobView]:
        """Jobs handed to an engine and not finished (to re-attach after a restart)."""
        self.sync()
        return [JobView.of(self._adopt(v)) for v in self._s.in_flight.rows(self._cur)]

    # ---- user verbs ------------------------------------------------------------------------------
    def request_cancel(self, task_id: str, reason: str = "cancelled by user") -> JobStatus:
        """Cancel: at once if the job has not been dispatched, else ask the agent to stop it."""
        row = self._get(task_id)
        if row is None:
            raise KeyError(task_id)
        status = JobStatus(row.status)
        if status.finished:
            return status
        if status is JobStatus.CREATED or (status is JobStatus.QUEUED and not row.dispatched):
            row.error = reason
            self._move(row, JobStatus.CANCELLED, reason)
            self._result(row, Outcome(JobStatus.CANCELLED, error=reason))
            return JobStatus.CANCELLED
        row.cancel_requested = True
        row.reason = f"cancel requested ({reason}); waiting for the site agent to stop it"
        self._touch(row)
        return status

    def cancel_requests(self) -> list[str]:
        """Ids of dispatched jobs a user asked to cancel."""
        self.sync()
        return self._s.cancel_requests.scalars(self._cur)

    def retry(self, task_id: str, reason: str = "retried by user") -> JobStatus:
        """Queue a failed, timed-out or cancelled job again."""
        row = self._get(task_id)
        if row is None:
            raise KeyError(task_id)
        self._move(row, JobStatus.QUEUED, reason)
        row.max_retries = max(row.max_retries, row.attempt)
        return JobStatus.QUEUED

    def backlog(self) -> int:
        """Jobs waiting (created or queued, not dispatched)."""
        self.sync()
        return int(self._s.backlog.scalars(self._cur)[0] or 0)

    # ---- outbox ------------------------------------------------------------------------------------
    def pending_events(
        self, limit: int = 500, kind: str | None = None, cached: Callable[[int], Pending | None] = lambda _id: None
    ) -> list[Pending]:
        """Outbox rows not yet published, oldest first.

        ``cached`` returns the rows the caller still holds (by id): only the others are read and parsed.
        """
        self.sync()
        if kind:
            ids = self._s.pending_of_kind.scalars(self._cur, n=limit, kind=kind)
        else:
            ids = self._s.pending.scalars(self._cur, n=limit)
        found: dict[int, Pending] = {}
        missing: list[int] = []
        # Rows this batch wrote are not the caller's yet (it gets them after the commit).
        mine = {p.id: p for p in self.written} if self.written else {}
        for i in ids:
            p = cached(i) or mine.get(i)
            if p is None:
                missing.append(i)
            else:
                found[i] = p
        if missing:
            for i, kind, event_id, topic, key, payload in self._s.outbox_rows.rows(self._cur, ids=self._s.ids(missing)):
                found[i] = Pending(i, kind, event_id, topic, key.encode(), Envelope.from_json(payload.encode()))
        return [found[i] for i in ids]

    def oldest_pending(self) -> datetime | None:
        """When the oldest unpublished outbox row was written (``None``: there is none)."""
        self.sync()
        found = self._s.oldest_pending.scalars(self._cur)
        return aware(found[0]) if found else None

    def mark_published(self, ids: Sequence[int]) -> None:
        """Kafka acknowledged these outbox rows."""
        if ids:
            self._s.mark.rows(self._cur, ids=self._s.ids(sorted(ids)))

    # ---- writing -----------------------------------------------------------------------------------
    def sync(self) -> None:
        """Settle dependencies and write what changed, so that a query sees it (the transaction stays open)."""
        self._settle()
        s, cur = self._s, self._cur
        if self._new:
            s.insert_jobs.write(cur, self._new.values())
            self._new.clear()
        if self._dirty:
            s.update_jobs.write(cur, [self._rows[t] for t in sorted(self._dirty)])
            self._dirty.clear()
        if self._new_deps:
            s.insert_deps.write(cur, [{"task_id": t, "depends_on": d} for t, d in self._new_deps])
            self._new_deps.clear()
        if self._transitions:
            s.insert_transitions.write(cur, self._transitions)
            self._transitions = []
        if self._events:
            self._write_events()

    def _write_events(self) -> None:
        now = utcnow()
        events, self._events = self._events, []
        values = [
            {
                "kind": kind,
                "event_id": env.id,
                "topic": topic,
                "key": key,
                "payload": env.to_json().decode(),
                "published": False,
                "created_at": now,
            }
            for kind, env, topic, key in events
        ]
        s = self._s
        if not s.database_gives_ids:
            # The batch holds SQLite's write lock (BEGIN IMMEDIATE): the next ids are ours to give.
            first = int(s.max_outbox_id.scalars(self._cur)[0]) + 1
            ids: Sequence[int] = range(first, first + len(values))
            for i, v in zip(ids, values, strict=True):
                v["id"] = i
            s.insert_outbox.write(self._cur, values)
        else:
            # Other writers may insert at the same time: the database gives the ids.
            ids = [s.insert_outbox_returning.scalars(self._cur, **v)[0] for v in values]
        # The publisher marks these ids published.
        self.written.extend(
            Pending(i, kind, env.id, topic, key.encode(), env)
            for i, (kind, env, topic, key) in zip(ids, events, strict=True)
        )


class JobStore:
    """The job table and its state machine for one site."""

    def __init__(self, url: str, site: str, topics: Topics) -> None:
        self.site = site
        self.topics = topics
        self.sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.sqlite:
            # isolation_level=None: the driver starts no transaction of its own; a batch begins one
            # with BEGIN IMMEDIATE (see run), reads outside batches need none (WAL).
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30, "isolation_level": None}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        for attempt in range(10):
            try:
                Base.metadata.create_all(self.engine)
                # A database made before the index existed gets it too (create_all skips existing tables).
                CLAIM_INDEX.create(self.engine, checkfirst=True)
                break
            except OperationalError:
                # Another process (agent or CLI) is creating the tables at the same moment.
                if attempt == 9:
                    raise
                time.sleep(0.1)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._statements = _Statements(self.engine.dialect)
        self._raw: PoolProxiedConnection | None = None
        # Requests of jobs not ended, as they came in (parsing them again from their rows costs more).
        self._requests: dict[str, TaskRequest] = {}

    def close(self) -> None:
        """Release connections."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # ---- batches -----------------------------------------------------------------------------------
    def run(self, ops: Sequence[Callable[[Batch], Any]]) -> tuple[list[Any], list[Pending]]:
        """Apply ``ops`` in order in one transaction; their results, and the outbox rows written.

        If one operation raises, the transaction is rolled back and the error raised: nothing of
        the batch is kept (the caller may apply the operations one by one to isolate it).
        """
        if self._raw is None:
            # One driver connection for batches, kept open (checking one out of the pool and
            # back costs more than a small batch). Batches run on one thread at a time.
            self._raw = self.engine.raw_connection()
        # SQLAlchemy types it Optional: it is None only once the pooled connection is invalidated.
        raw: Any = self._raw.driver_connection
        cursor = raw.cursor()
        try:
            if self.sqlite:
                # The write lock from the start: the rows this batch reads cannot change under it
                # (another process, e.g. `jobs cancel`, waits up to busy_timeout for this commit).
                cursor.execute("BEGIN IMMEDIATE")
            batch = Batch(cursor, self._statements, self.site, self.topics, self._requests)
            results = [op(batch) for op in ops]
            batch.sync()
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cursor.close()
        return results, batch.written

    def _one(self, op: Callable[[Batch], T]) -> T:
        result: T = self.run([op])[0][0]
        return result

    # ---- one operation per transaction (the jobs CLI and tests) ---------------------------------
    def create_jobs(self, jobs: Iterable[NewJob]) -> list[str]:
        """Record new jobs in one transaction; ids already known are skipped. Returns created ids."""
        batch = list(jobs)
        return self._one(lambda b: b.create_jobs(batch))

    def claim(self, limit: int, engine: str) -> list[JobView]:
        """Take up to ``limit`` queued jobs for dispatch (highest priority, oldest first)."""
        return self._one(lambda b: b.claim(limit, engine))

    def submitted(
        self, task_id: str, native_id: str | None, workdir: str, running: bool, reason: str, machine: str | None = None
    ) -> None:
        """The engine took the job: remember its native id (for re-attaching) and why it waits."""
        self._one(lambda b: b.submitted(task_id, native_id, workdir, running, reason, machine))

    def note(self, task_id: str, reason: str, running: bool = False, machine: str | None = None) -> None:
        """Update the reason shown for a job (and move queued -> running when it starts)."""
        self._one(lambda b: b.note(task_id, reason, running, machine))

    def finish(self, task_id: str, outcome: Outcome) -> JobStatus | None:
        """Record how an attempt ended (see :meth:`Batch.finish`)."""
        return self._one(lambda b: b.finish(task_id, outcome))

    def requeue_lost(self, task_id: str, reason: str) -> None:
        """Put a job whose execution was lost (agent crash) back in the queue; no retry is used."""
        self._one(lambda b: b.requeue_lost(task_id, reason))

    def in_flight(self) -> list[JobView]:
        """Jobs handed to an engine and not finished (to re-attach after a restart)."""
        return self._one(lambda b: b.in_flight())

    def request_cancel(self, task_id: str, reason: str = "cancelled by user") -> JobStatus:
        """Cancel: at once if the job has not been dispatched, else ask the agent to stop it."""
        return self._one(lambda b: b.request_cancel(task_id, reason))

    def cancel_requests(self) -> list[str]:
        """Ids of dispatched jobs a user asked to cancel."""
        return self._one(lambda b: b.cancel_requests())

    def retry(self, task_id: str, reason: str = "retried by user") -> JobStatus:
        """Queue a failed, timed-out or cancelled job again."""
        return self._one(lambda b: b.retry(task_id, reason))

    def pending_events(self, limit: int = 500, kind: str | None = None) -> list[Pending]:
        """Outbox rows not yet published, oldest first."""
        return self._one(lambda b: b.pending_events(limit, kind))

    def mark_published(self, ids: list[int]) -> None:
        """Kafka acknowledged these outbox rows."""
        if ids:
            self._one(lambda b: b.mark_published(ids))

    def backlog(self) -> int:
        """Jobs waiting (created or queued, not dispatched)."""
        return self._one(lambda b: b.backlog())

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
                r.at = utc(r.at)
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


def _dependency_verdict(deps: list[str], rows: dict[str, _Job]) -> tuple[JobStatus, str]:
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
