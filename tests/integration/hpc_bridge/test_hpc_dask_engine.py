"""Dask engine on a real LocalCluster: tasks run, a worker killed mid-task -> retried, finished once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.engines.dask_engine import DaskEngine
from reflexarc.hpc_bridge.site_config import DaskEngineSettings, SiteConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

APPS = "reflexarc.hpc_bridge.examples.apps"


def dask_site(tmp_path: Path, kafka: KafkaSettings) -> SiteConfig:
    """A site whose engine is a 2-worker LocalCluster."""
    return SiteConfig.model_validate(
        {
            "site": "dasky",
            "kafka": kafka.model_dump(),
            "state_dir": str(tmp_path / "state"),
            "engine": {"kind": "dask", "dask": {"cluster": "local", "n_workers": 2}},
            "apps": {
                "add": {"function": f"{APPS}:add"},
                "sleep": {"function": f"{APPS}:sleep", "retries": 1, "on_failure": "retry"},
                "count": {"argv": ["wc", "-c", "{path}"]},
            },
        }
    )


async def test_dask_runs_tasks_and_survives_a_killed_worker(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    agent = SiteAgent(dask_site(tmp_path, kafka_settings))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    marks = tmp_path / "marks"
    text = tmp_path / "five.txt"
    text.write_text("12345")
    try:
        async with SiteClient(kafka_settings) as client:
            adds = [TaskRequest(task_id=f"d-{i}", app="add", args={"a": i, "b": 1}, site="dasky") for i in range(20)]
            await client.submit(
                [*adds, TaskRequest(task_id="d-cmd", app="count", args={"path": str(text)}, site="dasky")]
            )
            res = await client.wait_results([a.task_id for a in adds] + ["d-cmd"], 60)
            assert all(res[f"d-{i}"].result == {"sum": i + 1} for i in range(20))
            assert res["d-cmd"].result and res["d-cmd"].result["stdout"].split()[0] == "5"
            # Kill the worker process while it runs a task.
            await client.submit(
                [
                    TaskRequest(
                        task_id="d-victim",
                        app="sleep",
                        site="dasky",
                        args={"seconds": 3, "marker_dir": str(marks), "tag": "v"},
                    )
                ]
            )
            deadline = time.monotonic() + 30
            while not (marks.exists() and any(marks.iterdir())):
                assert time.monotonic() < deadline, "the task never started"
                await asyncio.sleep(0.05)
            victim = int(next(marks.iterdir()).read_text())
            assert victim != os.getpid()
            os.kill(victim, signal.SIGKILL)
            r = (await client.wait_results(["d-victim"], 60))["d-victim"]
            assert r.status == "done" and r.attempts == 2
            await asyncio.sleep(1.0)
            assert len(client.results["d-victim"]) == 1
            assert len(list(marks.iterdir())) == 2  # ran twice, finished once
            failed = [s for s in client.states["d-victim"] if s.state == "failed"]
            assert failed and "worker" in failed[0].reason.lower()
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)


async def test_adaptive_local_cluster_scales_with_backlog(tmp_path: Path) -> None:
    from reflexarc.hpc_bridge.worker import RunSpec

    engine = DaskEngine(
        DaskEngineSettings(cluster="local", adapt={"minimum": 0, "maximum": 2, "idle_timeout_s": 2, "interval_s": 0.5})
    )
    await engine.start()
    try:
        assert await engine.workers() == 0
        specs = [
            RunSpec(
                task_id=f"a{i}",
                attempt=1,
                kind="python",
                workdir=str(tmp_path / f"a{i}"),
                result_path=str(tmp_path / f"a{i}" / "o.json"),
                function=f"{APPS}:sleep",
                args={"seconds": 1.0},
            )
            for i in range(6)
        ]
        execs = [await engine.submit(s) for s in specs]
        grew = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and grew < 2:
            grew = max(grew, await engine.workers())
            await asyncio.sleep(0.2)
        outcomes = await asyncio.gather(*(e.wait() for e in execs))
        assert all(o.status.value == "done" for o in outcomes)
        assert grew == 2
        deadline = time.monotonic() + 30
        while await engine.workers() > 0:
            assert time.monotonic() < deadline, "idle workers were not retired"
            await asyncio.sleep(0.2)
    finally:
        await engine.close()
