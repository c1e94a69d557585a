"""The local engine's pipelined workers and the worker's cheap paths (real worker processes, no broker)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from reflexarc.hpc_bridge import worker
from reflexarc.hpc_bridge.engines.local import LocalEngine
from reflexarc.hpc_bridge.states import JobStatus
from reflexarc.hpc_bridge.worker import RunSpec, execute

APPS = "reflexarc.hpc_bridge.examples.apps"


def sleep_spec(tmp: Path, tag: str, seconds: float) -> RunSpec:
    """A task that sleeps and leaves one marker file per start (tag.pid.ns) in ``tmp/markers``."""
    return RunSpec(
        task_id=tag,
        attempt=1,
        kind="python",
        workdir=str(tmp / tag),
        result_path=str(tmp / tag / "o.json"),
        function=f"{APPS}:sleep",
        args={"seconds": seconds, "marker_dir": str(tmp / "markers"), "tag": tag},
    )


@pytest.fixture
async def engine() -> AsyncIterator[LocalEngine]:
    """A pool of one worker: a second task can only queue behind the first."""
    e = LocalEngine(1)
    try:
        yield e
    finally:
        await e.close()


async def queued_behind(engine: LocalEngine) -> None:
    """Wait until a second task's line is in the busy worker's pipe."""
    async with asyncio.timeout(10):
        while not any(len(w.owed) == 2 for w in engine._workers):
            await asyncio.sleep(0.01)


def starts(tmp: Path, tag: str) -> int:
    """How often the task ``tag`` started."""
    return len(list((tmp / "markers").glob(f"{tag}.*"))) if (tmp / "markers").exists() else 0


async def test_a_task_behind_a_busy_worker_starts_there_when_the_one_ahead_ends(
    tmp_path: Path, engine: LocalEngine
) -> None:
    first = await engine.submit(sleep_spec(tmp_path, "a", 0.5))
    behind = asyncio.create_task(engine.submit(sleep_spec(tmp_path, "b", 0.0)))
    await queued_behind(engine)
    # Written to the busy worker's pipe, but not started: submit has not returned.
    assert not behind.done()
    a = await first.wait()
    second = await behind
    b = await second.wait()
    assert a.status is JobStatus.DONE and b.status is JobStatus.DONE
    assert a.result is not None and b.result is not None
    assert a.result["pid"] == b.result["pid"]  # the same process ran both: no new worker was needed
    assert a.finished_at is not None and b.started_at is not None and b.started_at >= a.finished_at
    assert starts(tmp_path, "a") == 1 and starts(tmp_path, "b") == 1


async def test_cancelling_the_task_ahead_hands_the_one_behind_to_a_new_worker(
    tmp_path: Path, engine: LocalEngine
) -> None:
    first = await engine.submit(sleep_spec(tmp_path, "a", 30))
    behind = asyncio.create_task(engine.submit(sleep_spec(tmp_path, "b", 0.0)))
    await queued_behind(engine)
    assert not behind.done()
    await first.cancel()
    assert (await first.wait()).status is JobStatus.CANCELLED
    second = await asyncio.wait_for(behind, 30)
    b = await second.wait()
    assert b.status is JobStatus.DONE, b.error
    assert starts(tmp_path, "b") == 1  # never started in the killed worker, once in the new one


async def test_a_submit_cancelled_while_queued_never_runs_its_task(tmp_path: Path, engine: LocalEngine) -> None:
    first = await engine.submit(sleep_spec(tmp_path, "a", 0.5))
    behind = asyncio.create_task(engine.submit(sleep_spec(tmp_path, "b", 0.0)))
    await queued_behind(engine)
    behind.cancel()
    with pytest.raises(asyncio.CancelledError):
        await behind
    a = await first.wait()
    assert a.status is JobStatus.DONE  # the task ahead is not harmed
    # "b" was skipped, not run, and the same worker goes on with the next task.
    c = await (await engine.submit(sleep_spec(tmp_path, "c", 0.0))).wait()
    assert c.status is JobStatus.DONE and c.result is not None and a.result is not None
    assert c.result["pid"] == a.result["pid"]
    assert starts(tmp_path, "b") == 0 and starts(tmp_path, "c") == 1


async def test_a_worker_that_dies_fails_its_task_and_the_pool_goes_on(tmp_path: Path, engine: LocalEngine) -> None:
    ex = await engine.submit(sleep_spec(tmp_path, "a", 30))
    behind = asyncio.create_task(engine.submit(sleep_spec(tmp_path, "b", 0.0)))
    await queued_behind(engine)
    os.kill(int(ex.native_id.split(":")[1]), 9)  # type: ignore[union-attr]
    out = await ex.wait()
    assert out.status is JobStatus.FAILED and "SIGKILL" in (out.error or "")
    b = await (await asyncio.wait_for(behind, 30)).wait()
    assert b.status is JobStatus.DONE and starts(tmp_path, "b") == 1


def test_run_spec_json_round_trip_does_not_share_the_spec(tmp_path: Path) -> None:
    spec = RunSpec(
        task_id="t",
        attempt=2,
        kind="python",
        workdir="/w",
        result_path="/w/o.json",
        function="m:f",
        args={"nested": {"a": [1, 2]}},
        environment={"X": "1"},
        pythonpath=["/p"],
    )
    text = spec.to_json()
    assert RunSpec.from_json(text) == spec
    assert json.loads(text)["args"] == {"nested": {"a": [1, 2]}}
    copy = RunSpec.from_json(text)
    copy.args["nested"]["a"].append(3)
    assert spec.args == {"nested": {"a": [1, 2]}}


def test_outcome_fsync_only_where_the_file_is_the_only_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(worker.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    base = {"attempt": 1, "kind": "python", "function": f"{APPS}:add", "args": {"a": 1, "b": 2}}
    execute(RunSpec(task_id="s", workdir=str(tmp_path / "s"), result_path=str(tmp_path / "s/o.json"), **base))
    assert len(synced) == 1  # `worker.py run` (batch jobs, pilots): fsynced
    out = execute(
        RunSpec(task_id="n", workdir=str(tmp_path / "n"), result_path=str(tmp_path / "n/o.json"), **base), sync=False
    )
    assert len(synced) == 1  # a serve worker: its agent commits the outcome
    assert worker.read_outcome(str(tmp_path / "n/o.json")) == json.loads(json.dumps(out))


def test_environment_is_restored_after_the_task_and_after_the_app_changed_it(tmp_path: Path) -> None:
    before = dict(os.environ)
    spec = RunSpec(
        task_id="e",
        attempt=1,
        kind="python",
        workdir=str(tmp_path / "e"),
        result_path=str(tmp_path / "e/o.json"),
        function="os:getenv",
        args={"key": "RX_T1"},
        environment={"RX_T1": "1"},
    )
    assert execute(spec)["result"] == {"value": "1"}  # the task saw its variable
    assert dict(os.environ) == before
    # The app itself changes the environment: undone after it.
    spec2 = RunSpec(
        task_id="f",
        attempt=1,
        kind="python",
        workdir=str(tmp_path / "f"),
        result_path=str(tmp_path / "f/o.json"),
        function="os:environ.update",
        args={"RX_T3": "3"},
    )
    assert execute(spec2)["ok"]
    assert dict(os.environ) == before
