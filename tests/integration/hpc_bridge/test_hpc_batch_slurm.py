"""Batch engine on a real single-node Slurm (Debian packages) through PSI/J."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.hpc_bridge.store import JobStore
from reflexarc.testing.slurm import SlurmCluster
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

APPS = "reflexarc.hpc_bridge.examples.apps"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One real Slurm for this module's tests."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4, memory_mb=8000)
    cluster.start()
    yield cluster
    cluster.stop()


def batch_site(tmp_path: Path, kafka: KafkaSettings, slurm: SlurmCluster) -> SiteConfig:
    """A site whose engine is Slurm via PSI/J."""
    return SiteConfig.model_validate(
        {
            "site": "slurmy",
            "kafka": kafka.model_dump(),
            "state_dir": str(tmp_path / "state"),
            "engine": {
                "kind": "batch",
                "batch": {"scheduler": "slurm", "poll_interval_s": 1, "env": {"SLURM_CONF": str(slurm.conf_path)}},
            },
            "apps": {
                "add": {"function": f"{APPS}:add"},
                "slow": {"function": f"{APPS}:sleep", "timeout_s": 4, "retries": 1, "on_failure": "retry"},
                "long": {"function": f"{APPS}:sleep", "on_failure": "ignore"},
            },
        }
    )


class Running:
    """An in-process agent that can be stopped and started again."""

    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(SiteAgent(self.cfg).run(self.stop))

    async def halt(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def site(
    tmp_path: Path, kafka_settings: KafkaSettings, slurm: SlurmCluster
) -> AsyncIterator[tuple[Running, SiteClient, SlurmCluster]]:
    """Agent + client; Slurm's queue is emptied afterwards."""
    agent = Running(batch_site(tmp_path, kafka_settings, slurm))
    agent.start()
    async with SiteClient(kafka_settings) as client:
        try:
            yield agent, client, slurm
        finally:
            await agent.halt()
            slurm.cancel_all()


def store_of(cfg: SiteConfig) -> JobStore:
    """Read-only view of the agent's database."""
    return JobStore(cfg.database_url, cfg.site, Topics())


async def native_id_when_running(cfg: SiteConfig, task_id: str, timeout: float = 60) -> str:
    """Wait until the job runs in Slurm; return the Slurm job id."""
    store = store_of(cfg)
    try:
        for _ in range(int(timeout * 10)):
            job = store.get(task_id)
            if job and job.native_id and job.status.value == "running":
                return job.native_id
            await asyncio.sleep(0.1)
    finally:
        store.close()
    raise AssertionError(f"{task_id} never ran")


def r(task_id: str, app: str, **args: Any) -> TaskRequest:
    """A request for the Slurm site."""
    return TaskRequest(task_id=task_id, app=app, args=args, site="slurmy")


async def test_batch_job_runs_through_sbatch(site: tuple[Running, SiteClient, SlurmCluster]) -> None:
    agent, client, slurm = site
    await client.submit([r("b-add", "add", a=20, b=22)])
    res = (await client.wait_results({"b-add"}, 90))["b-add"]
    assert res.status == "done" and res.result == {"sum": 42}
    store = store_of(agent.cfg)
    try:
        job = store.get("b-add")
        assert job is not None and job.engine == "batch" and job.native_id and job.native_id.isdigit()
    finally:
        store.close()
    # Slurm itself recorded the job as completed.
    out = slurm.run("scontrol", "show", "job", "-o", job.native_id, check=False).stdout
    comp = (slurm.workdir / "jobcomp.txt").read_text() if (slurm.workdir / "jobcomp.txt").exists() else ""
    assert "JobState=COMPLETED" in out or f"JobId={job.native_id} " in comp


async def test_walltime_exceeded_is_timed_out_and_retried(site: tuple[Running, SiteClient, SlurmCluster]) -> None:
    _, client, _ = site
    await client.submit([r("b-slow", "slow", seconds=120)])
    res = (await client.wait_results({"b-slow"}, 120))["b-slow"]
    assert res.status == "timed_out" and res.attempts == 2, res
    states = [s.state for s in client.states["b-slow"]]
    assert states.count("timed_out") == 2 and "queued" in states[2:], states


async def test_scancel_from_outside_is_cancelled(site: tuple[Running, SiteClient, SlurmCluster]) -> None:
    agent, client, slurm = site
    await client.submit([r("b-long", "long", seconds=120)])
    nid = await native_id_when_running(agent.cfg, "b-long")
    slurm.run("scancel", nid)
    res = (await client.wait_results({"b-long"}, 60))["b-long"]
    assert res.status == "cancelled"
    assert "outside" in (res.error or "") and nid in (res.error or "")


async def test_restarted_agent_reattaches_to_running_batch_job(
    site: tuple[Running, SiteClient, SlurmCluster], tmp_path: Path
) -> None:
    agent, client, slurm = site
    marks = tmp_path / "marks"
    await client.submit([r("b-attach", "long", seconds=4, marker_dir=str(marks), tag="a")])
    nid = await native_id_when_running(agent.cfg, "b-attach")
    await agent.halt()  # the job keeps running in Slurm
    assert nid in slurm.job_ids()
    agent.start()
    res = (await client.wait_results({"b-attach"}, 90))["b-attach"]
    assert res.status == "done" and res.attempts == 1
    await asyncio.sleep(1.5)
    assert len(client.results["b-attach"]) == 1
    assert len(list(marks.iterdir())) == 1  # ran once: re-attached, not resubmitted
