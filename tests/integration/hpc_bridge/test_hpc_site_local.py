"""Site agent with the local engine against a real Tansu: results, states, idempotence, policies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from reflexarc.config import KafkaSettings
from reflexarc.events import Cause, TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.store import JobStore
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

APPS = "reflexarc.hpc_bridge.examples.apps"


def site_config(tmp_path: Path, kafka: KafkaSettings, **extra: Any) -> SiteConfig:
    """A site on the test broker with the example apps and a temp state dir."""
    data: dict[str, Any] = {
        "site": "hpc",
        "namespace": "rx",
        "kafka": kafka.model_dump(),
        "state_dir": str(tmp_path / "state"),
        "engine": {"kind": "local", "local": {"max_workers": 2}},
        "results": {"inline_max_bytes": 1000},
        "apps": {
            "add": {"function": f"{APPS}:add"},
            "sleep": {"function": f"{APPS}:sleep", "on_failure": "ignore"},
            "block": {"function": f"{APPS}:sleep"},
            "fail": {"function": f"{APPS}:fail", "on_failure": "cancel_successors"},
            "fail_hard": {"function": f"{APPS}:fail", "on_failure": "fail"},
            "fail_ignored": {"function": f"{APPS}:fail", "on_failure": "ignore"},
            "flaky": {"function": f"{APPS}:flaky", "retries": 2},
            "big": {"function": f"{APPS}:big"},
            "denoise": {"function": f"{APPS}:denoise"},
            "count": {"argv": ["wc", "-c", "{path}"]},
        },
    }
    data.update(extra)
    return SiteConfig.model_validate(data)


@pytest.fixture
async def running_site(tmp_path: Path, kafka_settings: KafkaSettings) -> AsyncIterator[tuple[SiteAgent, SiteClient]]:
    """An agent running in this event loop and a client on the same broker."""
    agent = SiteAgent(site_config(tmp_path, kafka_settings))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    async with SiteClient(kafka_settings) as client:
        yield agent, client
        stop.set()
        await asyncio.wait_for(task, 30)


def req(task_id: str, app: str, **args: Any) -> TaskRequest:
    """A request for the test site."""
    return TaskRequest(task_id=task_id, app=app, args=args, site="hpc")


async def test_results_states_and_trigger_propagation(running_site: tuple[SiteAgent, SiteClient]) -> None:
    _agent, client = running_site
    cause = Cause(event_ids=["e1", "e2"], site="bl1", device="det1", stream="counts")
    r = TaskRequest(task_id="t-add", app="add", args={"a": 2, "b": 3}, site="hpc", trigger="peak", cause=cause)
    await client.submit([r])
    res = (await client.wait_results({"t-add"}, 30))["t-add"]
    assert res.status == "done" and res.result == {"sum": 5}
    assert res.trigger == "peak" and res.cause == cause
    assert res.machine and res.started_at and res.attempts == 1
    # Every transition is a JobState event with a reason, in order.
    for _ in range(50):
        if [s.state for s in client.states["t-add"]][-1:] == ["done"]:
            break
        await asyncio.sleep(0.1)
    states = client.states["t-add"]
    assert [s.state for s in states] == ["queued", "running", "done"]
    assert [s.seq for s in states] == [1, 2, 3]
    assert all(s.reason for s in states)


async def test_duplicate_task_id_runs_once_and_bad_input_is_dead_lettered(
    running_site: tuple[SiteAgent, SiteClient], tmp_path: Path
) -> None:
    agent, client = running_site
    marks = tmp_path / "marks"
    r = req("t-dup", "sleep", seconds=0.2, marker_dir=str(marks), tag="dup")
    await client.submit([r, r])
    await client.send_raw("hpc", b"this is not a cloud event")
    await client.wait_results({"t-dup"}, 30)
    await client.submit([r])  # redelivered after it finished: still one job, one run, one result
    await client.submit([req("t-after", "add", a=1, b=1)])
    await client.wait_results({"t-after"}, 30)
    assert len(client.results["t-dup"]) == 1
    assert len(list(marks.iterdir())) == 1
    # The garbage went to the dead-letter topic with the reason, and did not stop the agent.
    from reflexarc.envelope import DeadLetter
    from reflexarc.kafka import make_consumer

    consumer = make_consumer(agent.kafka, Topics().kafka_deadletter, group_id=None)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=5000)
        letters = [DeadLetter.from_kafka(r.value, r.headers) for rs in batches.values() for r in rs]
    finally:
        await consumer.stop()
    assert any(d.payload == b"this is not a cloud event" and "CloudEvent" in d.error for d in letters)


async def test_unknown_app_is_a_failed_result_naming_known_apps(running_site: tuple[SiteAgent, SiteClient]) -> None:
    _, client = running_site
    await client.submit([req("t-unknown", "nope")])
    res = (await client.wait_results({"t-unknown"}, 30))["t-unknown"]
    assert res.status == "failed"
    assert "'nope'" in (res.error or "") and "add" in (res.error or "") and "denoise" in (res.error or "")


async def test_retry_then_success_timeout_and_large_result(
    running_site: tuple[SiteAgent, SiteClient], tmp_path: Path
) -> None:
    _, client = running_site
    counter = tmp_path / "flaky.count"
    text = tmp_path / "ten.txt"
    text.write_text("0123456789")
    timeout_req = TaskRequest(task_id="t-slow", app="sleep", args={"seconds": 30}, site="hpc", timeout_s=1)
    await client.submit(
        [
            req("t-flaky", "flaky", counter=str(counter), fail_times=2),
            timeout_req,
            req("t-big", "big", n=5000),
            req("t-cmd", "count", path=str(text)),
        ]
    )
    res = await client.wait_results({"t-flaky", "t-slow", "t-big", "t-cmd"}, 60)
    assert res["t-flaky"].status == "done" and res["t-flaky"].attempts == 3
    assert res["t-flaky"].result == {"calls": 3}
    flaky_states = [s.state for s in client.states["t-flaky"]]
    assert flaky_states.count("failed") == 2 and flaky_states.count("queued") == 3
    # sleep's policy is 'ignore' with no retries: timed out once, reported once.
    assert res["t-slow"].status == "timed_out" and "timeout of 1s" in (res["t-slow"].error or "")
    # Large results travel by reference (claim check) readable through fsspec.
    import fsspec

    big = res["t-big"]
    assert big.result is None and big.result_ref and big.result_ref.startswith("file://")
    with fsspec.open(big.result_ref) as f:
        assert len(json.loads(f.read())["data"]) == 5000
    assert res["t-cmd"].result and res["t-cmd"].result["stdout"].split()[0] == "10"


async def test_on_failure_policies_on_a_dag(running_site: tuple[SiteAgent, SiteClient]) -> None:
    _agent, client = running_site
    await client.submit(
        [
            # cancel_successors: b and its successor c are cancelled.
            req("p-a", "fail"),
            TaskRequest(task_id="p-b", app="add", args={"a": 1, "b": 1}, site="hpc", depends_on=["p-a"]),
            TaskRequest(task_id="p-c", app="add", args={"a": 1, "b": 1}, site="hpc", depends_on=["p-b"]),
            # fail: successors are failed.
            req("f-a", "fail_hard"),
            TaskRequest(task_id="f-b", app="add", args={"a": 1, "b": 1}, site="hpc", depends_on=["f-a"]),
            # ignore: successors run.
            req("i-a", "fail_ignored"),
            TaskRequest(task_id="i-b", app="add", args={"a": 2, "b": 2}, site="hpc", depends_on=["i-a"]),
            # a successor arriving before its dependency waits for it.
            TaskRequest(task_id="o-b", app="add", args={"a": 3, "b": 3}, site="hpc", depends_on=["o-a"]),
        ]
    )
    await asyncio.sleep(1.0)
    assert "o-b" not in client.results
    await client.submit([req("o-a", "add", a=0, b=0)])
    ids = {"p-a", "p-b", "p-c", "f-a", "f-b", "i-a", "i-b", "o-a", "o-b"}
    res = await client.wait_results(ids, 60)
    assert {k: v.status for k, v in res.items()} == {
        "p-a": "failed",
        "p-b": "cancelled",
        "p-c": "cancelled",
        "f-a": "failed",
        "f-b": "failed",
        "i-a": "failed",
        "i-b": "done",
        "o-a": "done",
        "o-b": "done",
    }
    assert "p-a" in (res["p-b"].error or "") and "cancel_successors" in (res["p-b"].error or "")
    assert "p-b" in (res["p-c"].error or "")
    # cancel_successors and fail do not retry; ignore has no retries by default.
    assert res["p-a"].attempts == 1 and res["f-a"].attempts == 1
    assert all(len(client.results[i]) == 1 for i in ids)


async def test_implement_selection_follows_site_resources(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    for gpus, expected in ((0, "cpu"), (1, "gpu")):
        cfg = site_config(tmp_path / f"g{gpus}", kafka_settings, site=f"hpc{gpus}", resources={"cpus": 2, "gpus": gpus})
        agent = SiteAgent(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            async with SiteClient(kafka_settings) as client:
                tid = f"impl-{gpus}"
                await client.submit(
                    [TaskRequest(task_id=tid, app="denoise", args={"values": [1, 2, 3]}, site=f"hpc{gpus}")]
                )
                res = (await client.wait_results({tid}, 30))[tid]
                assert res.status == "done"
                assert res.result and res.result["implementation"] == expected
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def test_jobs_table_records_reasons(running_site: tuple[SiteAgent, SiteClient]) -> None:
    agent, client = running_site
    await client.submit([req("r-1", "fail_ignored", message="disk full")])
    await client.wait_results({"r-1"}, 30)
    store = JobStore(agent.cfg.database_url, "hpc", Topics())
    try:
        job = store.get("r-1")
        assert job is not None and job.status.value == "failed" and "disk full" in job.reason
        assert [t.state for t in store.transitions("r-1")] == ["queued", "running", "failed"]
    finally:
        store.close()


async def test_jobs_cli_show_cancel_retry(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    from typer.testing import CliRunner

    from reflexarc.hpc_bridge.cli import jobs_app

    cfg = site_config(tmp_path, kafka_settings)
    site = tmp_path / "site.yaml"
    import yaml

    site.write_text(
        yaml.safe_dump(
            {
                **cfg.model_dump(mode="json", exclude={"kafka"}),
                "kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers},
            }
        )
    )
    agent = SiteAgent(cfg)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    runner = CliRunner()

    def cli(*args: str) -> str:
        out = runner.invoke(jobs_app, [*args, "--site", str(site)])
        assert out.exit_code == 0, out.output
        return out.output

    def state_text(task_id: str) -> str:
        return runner.invoke(jobs_app, ["show", task_id, "--site", str(site)]).output

    try:
        async with SiteClient(kafka_settings) as client:
            await client.submit(
                [
                    req("cli-long", "block", seconds=60),
                    TaskRequest(
                        task_id="cli-next", app="add", args={"a": 1, "b": 1}, site="hpc", depends_on=["cli-long"]
                    ),
                ]
            )
            for _ in range(300):
                if "state     running" in state_text("cli-long"):
                    break
                await asyncio.sleep(0.1)
            shown = cli("show", "cli-next")
            assert "created" in shown and "waiting for cli-long (running)" in shown
            assert "cli-long" in cli("list") and "running" in cli("list", "--status", "running")
            assert "cancel requested" in cli("cancel", "cli-long")
            res = await client.wait_results(["cli-long", "cli-next"], 30)
            assert res["cli-long"].status == "cancelled" and "jobs cancel" in (res["cli-long"].error or "")
            assert res["cli-next"].status == "cancelled"
            history = cli("show", "cli-long")
            assert "  running -> cancelled" in history and "cancelled by user" in history
            # Retry brings it back; a task id unknown to the site says so.
            assert "queued again" in cli("retry", "cli-long")
            for _ in range(300):
                if "state     running" in state_text("cli-long"):
                    break
                await asyncio.sleep(0.1)
            assert "retried by user" in cli("show", "cli-long")
            missing = runner.invoke(jobs_app, ["show", "nope", "--site", str(site)])
            assert missing.exit_code == 1 and "no job 'nope'" in missing.output
            cli("cancel", "cli-long")
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
