"""kill -9 of a site agent while a task runs on a composed machine: the machine is not leaked.

The restarted agent finds the machine in the composer database, runs the lost
task again on it (no new composition), and frees it after the idle timeout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from compose_site_kit import SiteProcess, open_composer, site_doc, until, write_pools

from reflexarc.config import KafkaSettings
from reflexarc.events import Resources, TaskRequest
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.compose import MachineState
from reflexarc.kafka import ensure_topics
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SITE = "gpusite2"


async def test_sigkill_mid_task_then_restart_reuses_and_frees_the_machine(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    write_pools(tmp_path / "pools.yaml", gpus=4, nodes=2)
    (tmp_path / "site.yaml").write_text(
        yaml.safe_dump(site_doc(tmp_path, kafka_settings.bootstrap_servers, SITE, idle_timeout_s=3.0, max_machines=2))
    )
    await ensure_topics(kafka_settings, [Topics().kafka_tasks(SITE)])
    site = SiteProcess(tmp_path / "site.yaml", tmp_path / "site.log")
    composer = open_composer(tmp_path)
    try:
        await site.start()
        async with SiteClient(kafka_settings) as client:
            req = TaskRequest(
                task_id="long", app="devices", site=SITE, args={"hold_s": 2.0}, resources=Resources(gpus=2)
            )
            await client.submit([req])
            await until(lambda: any(s.state == "running" for s in client.states["long"]), 30, "the task to run")
            machine_id = next(s.machine for s in client.states["long"] if s.state == "running")
            assert machine_id and composer.show(machine_id).state is MachineState.COMPOSED
            site.proc.kill()  # SIGKILL: no clean stop, the machine stays composed
            assert composer.show(machine_id).state is MachineState.COMPOSED

            await site.start()
            res = (await client.wait_results(["long"], 60))["long"]
            assert res.status == "done" and res.machine == machine_id
            assert res.result and res.result["machine"] == machine_id and len(res.result["cuda_visible_devices"]) == 2
            assert res.attempts == 1  # a run lost with the agent uses no retry
            assert "adopted 1 composed machine" in site.text()
            # One machine was ever composed; after the idle timeout it is freed.
            await until(lambda: composer.pools().used() == 0, 30, "the machine to be freed")
            assert [m.id for m in composer.list(all=True)] == [machine_id]
            assert [(e.action, e.outcome) for e in composer.audit()] == [("compose", "ok"), ("free", "ok")]
            assert len(client.results["long"]) == 1
    finally:
        assert site.proc.stop(grace=20) == 0, site.proc.log_tail()
        composer.close()
