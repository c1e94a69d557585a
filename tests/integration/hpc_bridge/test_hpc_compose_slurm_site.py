"""The site agent with the Slurm compose driver: a 2-GPU task runs inside the composed allocation.

Real single-node Slurm with GRES gpu:a100:4 (configured by the test), real
Tansu, the site agent in this event loop. The machine is a Slurm holder job;
the task is a job step of it (``srun --jobid --overlap``), sees the GPUs Slurm
gave it, and the allocation is gone after the idle timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from compose_site_kit import TOKEN, open_composer, site_doc, until, write_pools

from reflexarc.config import KafkaSettings
from reflexarc.events import Resources, TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.compose import MachineState
from reflexarc.hpc_bridge.engines.allocation import STEP_PREFIX, cancel_task_steps
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.testing.slurm import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SITE = "slurmsite"


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[SlurmCluster]:
    """One Slurm node with 8 CPUs and 4 fake A100s as GRES."""
    with SlurmCluster(tmp_path / "slurm", cpus=8, gres={"gpu:a100": 4}) as cluster:
        yield cluster


def gres_used(slurm: SlurmCluster) -> str:
    """The node's ``GresUsed=`` value (e.g. ``gpu:a100:2(IDX:0-1)``)."""
    out = slurm.run("scontrol", "-d", "show", "node", "-o", slurm.node_name).stdout
    return next(f for f in out.split() if f.startswith("GresUsed=")).removeprefix("GresUsed=")


def steps(slurm: SlurmCluster, job_id: str) -> str:
    """``step-id|name`` lines of a job's steps."""
    return slurm.run("squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j").stdout


async def test_two_gpu_task_runs_inside_the_composed_slurm_allocation(
    tmp_path: Path, kafka_settings: KafkaSettings, slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RX_COMPOSE_TOKEN", TOKEN)
    write_pools(tmp_path / "pools.yaml", node=slurm.node_name, gpus=4, nodes=1, gres_type="a100")
    doc = site_doc(
        tmp_path,
        kafka_settings.bootstrap_servers,
        SITE,
        driver="slurm",
        idle_timeout_s=3.0,
        slurm={"env": {"SLURM_CONF": str(slurm.conf_path)}, "start_timeout_s": 60},
    )
    agent = SiteAgent(SiteConfig.model_validate(doc))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    composer = open_composer(tmp_path)
    try:
        async with SiteClient(kafka_settings) as client:
            gpu = Resources(cpus=2, gpus=2)
            await client.submit(
                [TaskRequest(task_id="s1", app="devices", site=SITE, resources=gpu, args={"hold_s": 0.5})]
            )
            first = (await client.wait_results(["s1"], 90))["s1"]
            assert first.status == "done", first.error
            machine = composer.show(first.machine or "")
            job_id = machine.realisation["job_id"]
            assert machine.driver == "slurm" and machine.realisation["gres"] == "gpu:a100:2"
            # It ran inside the holder job's allocation, as a step, with the 2 GPUs Slurm gave it.
            assert first.result is not None
            assert first.result["slurm_job_id"] == job_id and first.result["slurm_step_id"] not in (None, "batch")
            assert first.result["cuda_visible_devices"] == ["0", "1"]
            assert first.result["machine"] == machine.id
            await until(
                lambda: [s.state for s in client.states["s1"]] == ["queued", "running", "done"], 20, "the states of s1"
            )
            running = client.states["s1"][1]
            assert running.machine == machine.id and f"a step of Slurm job {job_id}" in running.reason
            # While idle the allocation is held; the next task reuses it (a second step, same job).
            assert slurm.run("squeue", "-h", "-j", job_id, "-o", "%T|%b").stdout.strip() == "RUNNING|gres:gpu:a100:2"
            assert gres_used(slurm).startswith("gpu:a100:2")
            # A step whose srun died with a killed agent stays in Slurm; a restarted agent cancels it.
            orphan = subprocess.Popen(
                ["srun", f"--jobid={job_id}", "--overlap", f"--job-name={STEP_PREFIX}orphan", "sleep", "60"],
                env=slurm.env,
            )
            await until(lambda: "rx-task-orphan" in steps(slurm, job_id), 30, "the orphan step")
            orphan.kill()
            orphan.wait()
            assert "rx-task-orphan" in steps(slurm, job_id)
            assert len(await asyncio.to_thread(cancel_task_steps, job_id, slurm.env)) == 1
            await until(lambda: "rx-task-orphan" not in steps(slurm, job_id), 30, "the orphan step to go")
            assert "batch" in steps(slurm, job_id)  # the allocation itself is untouched
            await client.submit([TaskRequest(task_id="s2", app="devices", site=SITE, resources=gpu)])
            second = (await client.wait_results(["s2"], 60))["s2"]
            assert second.status == "done" and second.machine == machine.id
            assert second.result and second.result["slurm_job_id"] == job_id
            assert second.result["slurm_step_id"] != first.result["slurm_step_id"]
            # Freed after the idle timeout: the holder job is gone, the GPUs are free again.
            await until(lambda: composer.show(machine.id).state is MachineState.FREED, 30, "the machine to be freed")
            assert slurm.job_ids() == []
            assert gres_used(slurm).startswith("gpu:a100:0")
            assert composer.pools().used() == 0
            assert [(e.action, e.outcome) for e in composer.audit()] == [("compose", "ok"), ("free", "ok")]
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        composer.close()
