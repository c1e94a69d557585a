"""The job table: idempotence, state machine, dependencies and policies (SQLite, no Kafka)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.hpc_bridge.states import JobStatus, OnFailure, TransitionError, check_transition
from reflexarc.hpc_bridge.store import JobStore, NewJob, Outcome
from reflexarc.topics import Topics


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", "hpc", Topics())
    yield s
    s.close()


def job(task_id: str, deps: list[str] | None = None, retries: int = 0, policy: OnFailure = OnFailure.RETRY) -> NewJob:
    return NewJob(
        TaskRequest(task_id=task_id, app="a", site="hpc", depends_on=deps or []), max_retries=retries, on_failure=policy
    )


def run(store: JobStore, task_id: str, outcome: Outcome) -> JobStatus | None:
    claimed = store.claim(10, "local")
    assert task_id in [j.task_id for j in claimed]
    store.submitted(task_id, "n1", "/tmp", True, "running")
    return store.finish(task_id, outcome)


def test_transitions() -> None:
    check_transition(JobStatus.RUNNING, JobStatus.QUEUED)
    with pytest.raises(TransitionError, match="from done to queued"):
        check_transition(JobStatus.DONE, JobStatus.QUEUED)


def test_create_is_idempotent(store: JobStore) -> None:
    assert store.create_jobs([job("t1"), job("t1")]) == ["t1"]
    assert store.create_jobs([job("t1")]) == []
    assert store.counts() == {"queued": 1}


def test_events_and_results_go_through_the_outbox(store: JobStore) -> None:
    store.create_jobs([job("t1")])
    run(store, "t1", Outcome(JobStatus.DONE, result={"x": 1}))
    pending = store.pending_events()
    states = [JobState.from_envelope(p.envelope) for p in pending if p.kind == "state"]
    results = [TaskResult.from_envelope(p.envelope) for p in pending if p.kind == "result"]
    assert [s.state for s in states] == ["queued", "running", "done"]
    assert [s.envelope.id for s in pending if s.kind == "state"] == ["t1.1", "t1.2", "t1.3"]
    assert len(results) == 1 and results[0].result == {"x": 1} and pending[-1].envelope.id == "t1.result"
    store.mark_published([p.id for p in pending])
    assert store.pending_events() == []
    # A late second answer is ignored: one result per task.
    assert store.finish("t1", Outcome(JobStatus.FAILED, error="late")) is None


def test_retry_until_exhausted(store: JobStore) -> None:
    store.create_jobs([job("t1", retries=1)])
    assert run(store, "t1", Outcome(JobStatus.FAILED, error="boom")) is JobStatus.QUEUED
    assert "retry 1 of 1" in store.get("t1").reason  # type: ignore[union-attr]
    assert run(store, "t1", Outcome(JobStatus.TIMED_OUT, error="slow")) is JobStatus.TIMED_OUT
    j = store.get("t1")
    assert j is not None and j.attempt == 2 and "no retries left" in j.reason


@pytest.mark.parametrize(
    ("policy", "successor"),
    [
        (OnFailure.IGNORE, "queued"),
        (OnFailure.CANCEL_SUCCESSORS, "cancelled"),
        (OnFailure.FAIL, "failed"),
        (OnFailure.RETRY, "cancelled"),
    ],
)
def test_failure_policies_reach_successors_transitively(store: JobStore, policy: OnFailure, successor: str) -> None:
    store.create_jobs([job("b", ["a"]), job("c", ["b"]), job("a", policy=policy)])
    assert store.get("b").status is JobStatus.CREATED  # type: ignore[union-attr]
    run(store, "a", Outcome(JobStatus.FAILED, error="boom"))
    assert store.get("b").status.value == successor  # type: ignore[union-attr]
    if successor != "queued":
        assert store.get("c").status.value == successor  # type: ignore[union-attr]
        assert "dependency a" in store.get("b").reason  # type: ignore[union-attr]


def test_waiting_reason_names_missing_dependency(store: JobStore) -> None:
    store.create_jobs([job("b", ["a"])])
    assert "a (not received yet)" in store.get("b").reason  # type: ignore[union-attr]
    store.create_jobs([job("a")])
    assert "a (queued)" in store.get("b").reason  # type: ignore[union-attr]
    run(store, "a", Outcome(JobStatus.DONE, result={}))
    assert store.get("b").status is JobStatus.QUEUED  # type: ignore[union-attr]


def test_reject_records_a_failed_result(store: JobStore) -> None:
    store.create_jobs([NewJob(TaskRequest(task_id="u", app="nope", site="hpc"), reject="unknown app 'nope'")])
    res = [TaskResult.from_envelope(p.envelope) for p in store.pending_events() if p.kind == "result"]
    assert res[0].status == "failed" and res[0].error == "unknown app 'nope'"


def test_cancel_queued_at_once_and_running_on_request(store: JobStore) -> None:
    store.create_jobs([job("q"), job("r")])
    assert store.request_cancel("q") is JobStatus.CANCELLED
    store.claim(10, "local")
    store.submitted("r", "n", "/tmp", True, "running")
    assert store.request_cancel("r") is JobStatus.RUNNING
    assert store.cancel_requests() == ["r"]
    store.finish("r", Outcome(JobStatus.CANCELLED, error="cancelled by user", retryable=False))
    assert store.retry("r") is JobStatus.QUEUED


def test_lost_job_is_requeued_without_using_a_retry(store: JobStore) -> None:
    store.create_jobs([job("t")])
    store.claim(1, "local")
    store.submitted("t", "n", "/tmp", True, "running")
    assert [j.task_id for j in store.in_flight()] == ["t"]
    store.requeue_lost("t", "agent restarted")
    j = store.get("t")
    assert j is not None and j.status is JobStatus.QUEUED and j.attempt == 0 and not j.dispatched
