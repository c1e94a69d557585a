"""Job-store batches: many operations, one transaction; all or nothing; no lost update from another process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql

from reflexarc.events import Cause, JobState, TaskRequest, TaskResult
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.store import Batch, JobStore, NewJob, Outcome, Pending, _Statements
from reflexarc.topics import Topics


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", "hpc", Topics())
    yield s
    s.close()


def new(task_id: str, deps: list[str] | None = None, **kw: Any) -> NewJob:
    return NewJob(TaskRequest(task_id=task_id, app="a", site="hpc", depends_on=deps or [], **kw))


def test_a_whole_task_in_one_batch_and_its_events_in_order(store: JobStore) -> None:
    cause = Cause(event_ids=["e1"], site="bl", device="d")
    results, written = store.run(
        [
            lambda b: b.create_jobs([new("t1", trigger="peak", cause=cause)]),
            lambda b: b.claim(5, "local"),
            lambda b: b.submitted("t1", "local:1", "/w", True, "running on the local engine"),
            lambda b: b.finish("t1", Outcome(JobStatus.DONE, result={"x": 1})),
        ]
    )
    assert results[0] == ["t1"] and [j.task_id for j in results[1]] == ["t1"] and results[3] is JobStatus.DONE
    assert [t.state for t in store.transitions("t1")] == ["queued", "running", "done"]
    # The rows written are handed back in id order, exactly as the outbox holds them.
    assert [p.id for p in written] == sorted(p.id for p in written)
    pending = store.pending_events()
    assert [(p.id, p.event_id) for p in written] == [(p.id, p.event_id) for p in pending]
    assert [p.event_id for p in written] == ["t1.1", "t1.2", "t1.3", "t1.result"]
    res = TaskResult.from_envelope(written[-1].envelope)
    assert res.result == {"x": 1} and res.trigger == "peak" and res.cause == cause  # copied from the request


def test_a_failing_operation_keeps_nothing_of_its_batch(store: JobStore) -> None:
    def boom(_b: Batch) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.run([lambda b: b.create_jobs([new("t1")]), boom])
    assert store.get("t1") is None and store.pending_events() == []
    assert store.create_jobs([new("t1")]) == ["t1"]  # the store is usable after a rollback


def test_dependencies_settle_within_one_batch(store: JobStore) -> None:
    store.run(
        [
            lambda b: b.create_jobs([new("b", ["a"]), new("c", ["b"]), new("a")]),
            lambda b: b.claim(1, "local"),
            lambda b: b.finish("a", Outcome(JobStatus.DONE, result={})),
        ]
    )
    b = store.get("b")
    c = store.get("c")
    assert b is not None and b.status is JobStatus.QUEUED
    assert c is not None and c.status is JobStatus.CREATED and "waiting for b (queued)" in c.reason


def test_time_of_a_transition_is_the_one_given(store: JobStore) -> None:
    from datetime import UTC, datetime

    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    store.create_jobs([new("t1")])
    store.claim(1, "local")
    store.run([lambda b: b.submitted("t1", "n", "/w", True, "running", at=at)])
    running = store.transitions("t1")[-1]
    assert running.state == "running" and running.at == at
    job = store.get("t1")
    assert job is not None and job.started_at == at


def test_pending_events_parse_only_rows_the_caller_does_not_hold(store: JobStore) -> None:
    store.create_jobs([new("t1"), new("t2")])
    first, second = store.pending_events()
    held = Pending(first.id, "state", "held", first.topic, first.key, first.envelope)
    got = store.run([lambda b: b.pending_events(10, None, {first.id: held}.get)])[0][0]
    assert got[0] is held and got[1].event_id == second.event_id == "t2.1"


def test_reads_for_the_cli_see_batched_writes(store: JobStore) -> None:
    store.run([lambda b: b.create_jobs([new("t1"), new("t2")]), lambda b: b.claim(1, "local")])
    assert store.counts() == {"queued": 2}
    assert {j.task_id for j in store.list_jobs()} == {"t1", "t2"}
    assert [j.task_id for j in store.list_jobs("queued", 1)]
    assert store.backlog() == 1
    assert [j.task_id for j in store.in_flight()] == ["t1"]


def test_outbox_ids_given_by_the_database(store: JobStore) -> None:
    # The path other databases take (ids from INSERT ... RETURNING), run here on SQLite.
    store._statements.database_gives_ids = True
    _, written = store.run([lambda b: b.create_jobs([new("t1"), new("t2")])])
    assert [p.id for p in written] == [p.id for p in store.pending_events()]
    assert [JobState.from_envelope(p.envelope).task_id for p in written] == ["t1", "t2"]


def test_another_process_waits_for_a_batch_and_loses_no_update(tmp_path: Path, store: JobStore) -> None:
    """A cancel request from the CLI (another connection) during a batch that reads the same row."""
    store.create_jobs([new("t1")])
    store.claim(1, "local")
    cli = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", "hpc", Topics())
    inside, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def slow_note(b: Batch) -> None:
        b.note("t1", "still starting")
        inside.set()
        assert release.wait(10)

    agent = threading.Thread(target=lambda: store.run([slow_note]))
    agent.start()
    assert inside.wait(10)
    cancel = threading.Thread(target=lambda: outcome.setdefault("state", cli.request_cancel("t1", "stop")))
    cancel.start()
    cancel.join(0.3)
    assert cancel.is_alive(), "the CLI wrote while the agent's batch held the row"
    release.set()
    agent.join(10)
    cancel.join(10)
    cli.close()
    job = store.get("t1")
    assert outcome["state"] is JobStatus.QUEUED and job is not None
    assert job.cancel_requested and "cancel requested (stop)" in job.reason


def test_statements_for_a_named_parameter_driver() -> None:
    """PostgreSQL (psycopg) takes named parameters: rows are written as dicts under the compiled names."""

    class Cursor:
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []

        def executemany(self, sql: str, params: list[Any]) -> None:
            self.calls.append((sql, params))

    s = _Statements(postgresql.psycopg.dialect())
    cur = Cursor()
    s.insert_transitions.write(
        cur, [{"task_id": "t", "seq": 1, "previous": None, "state": "queued", "reason": "r", "attempt": 1, "at": None}]
    )
    sql, params = cur.calls[0]
    assert "%(task_id)s" in sql and params == [
        {"task_id": "t", "seq": 1, "previous": None, "state": "queued", "reason": "r", "attempt": 1, "at": None}
    ]
    assert s.ids(["a", "b"]) == ["a", "b"] and "any(%(ids)s" in s.load.sql
