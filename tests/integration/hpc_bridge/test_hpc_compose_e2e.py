"""End to end: a trigger asks for 2 GPUs, the site composes a machine, runs the task there, frees it when idle.

Real Tansu, the real trigger engine process (``python -m reflexarc cloud run``),
the real site agent process (``python -m reflexarc site run``) with an
inventory pools file that has GPUs; the site itself offers none.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from compose_site_kit import AGENT_USER, SiteProcess, open_composer, site_doc, until, write_pools

from reflexarc.config import KafkaSettings
from reflexarc.envelope import Envelope, EventType
from reflexarc.events import stable_id
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.compose import MachineState
from reflexarc.kafka import ensure_topics, make_producer, send_event
from reflexarc.process import ManagedProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOPICS = Topics()
SITE = "gpusite"
IDLE_S = 3.0
T0 = datetime.now(UTC)


def triggers_yaml(bootstrap: str) -> str:
    """Three triggers: a 2-GPU task, a task that fits the site, and an impossible 8-GPU task."""
    return yaml.safe_dump(
        {
            "sites": ["site.yaml"],
            "kafka": {"bootstrap_servers": bootstrap},
            "worker": {"session_timeout": "6s", "reload_interval": "0.3s", "commit_interval": "0.5s"},
            "triggers": [
                {
                    "name": "gpu-analysis",
                    "on": "bl1/+/counts",
                    "when": "event.data.value > 100",
                    "then": [{"task": {"app": "devices", "args": {"hold_s": 1.0}, "resources": {"gpus": 2}}}],
                },
                {"name": "cpu-analysis", "on": "bl1/+/temp", "when": "true", "then": [{"task": {"app": "devices"}}]},
                {
                    "name": "huge",
                    "on": "bl1/+/huge",
                    "when": "true",
                    "then": [{"task": {"app": "devices", "resources": {"gpus": 8}}}],
                },
            ],
        }
    )


def data_event(eid: str, device: str, stream: str, value: float, i: int) -> Envelope:
    """An instrument event as the fog bridge puts it on rx.data."""
    return Envelope.for_device(
        EventType.DATA, "bl1", device, {"value": value}, subject=stream, id=eid, time=T0 + timedelta(seconds=i)
    )


async def produce(settings: KafkaSettings, events: list[Envelope]) -> None:
    """Send events to rx.data and wait for the broker's acks."""
    producer = make_producer(settings)
    await producer.start()
    try:
        await asyncio.gather(*[await send_event(producer, TOPICS.kafka_data, e) for e in events])
    finally:
        await producer.stop()


async def test_trigger_needing_two_gpus_runs_on_a_composed_machine_freed_after_idle(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    bootstrap = kafka_settings.bootstrap_servers
    write_pools(tmp_path / "pools.yaml", gpus=4, nodes=2)
    (tmp_path / "site.yaml").write_text(
        yaml.safe_dump(site_doc(tmp_path, bootstrap, SITE, idle_timeout_s=IDLE_S, max_machines=2))
    )
    (tmp_path / "triggers.yaml").write_text(triggers_yaml(bootstrap))
    await ensure_topics(kafka_settings, [*TOPICS.kafka_core(), TOPICS.kafka_tasks(SITE)])

    site = SiteProcess(tmp_path / "site.yaml", tmp_path / "site.log")
    cloud = ManagedProcess(
        "cloud",
        [sys.executable, "-m", "reflexarc", "cloud", "run", str(tmp_path / "triggers.yaml")],
        tmp_path / "cloud.log",
    )
    composer = None
    try:
        await site.start()
        cloud.start()
        await asyncio.to_thread(cloud.wait_ready, lambda: "trigger engine up" in cloud.log_tail(200), 90)
        async with SiteClient(kafka_settings) as client:
            gpu_events = [data_event(f"c{i}", f"det{i}", "counts", 500.0, i) for i in range(3)]
            await produce(
                kafka_settings,
                [
                    *gpu_events,
                    data_event("quiet", "det9", "counts", 5.0, 4),  # below the threshold: no task
                    data_event("t1", "therm", "temp", 20.0, 5),
                    data_event("h1", "big", "huge", 1.0, 6),
                ],
            )
            gpu_ids = [stable_id("gpu-analysis", e.id) for e in gpu_events]
            cpu_id, huge_id = stable_id("cpu-analysis", "t1"), stable_id("huge", "h1")
            results = await client.wait_results([*gpu_ids, cpu_id, huge_id], 60)

            # The 2-GPU tasks ran on composed machines and saw their 2 GPUs.
            composer = open_composer(tmp_path)
            composed = {m.id: m for m in composer.list(all=True)}
            for tid in gpu_ids:
                res = results[tid]
                assert res.status == "done", res.error
                assert res.machine in composed, (res.machine, list(composed))
                assert res.result is not None
                assert res.result["machine"] == res.machine
                assert res.result["cuda_visible_devices"] == ["0", "1"]
                assert sorted(res.result["gpu_devices"]) == sorted(
                    d.id for d in composed[res.machine].devices if d.kind == "gpu"
                )
                assert res.trigger == "gpu-analysis" and res.cause is not None
            # max_machines is 2: three tasks made two machines, one of them served twice.
            assert len(composed) == 2
            assert sorted(sum(results[t].machine == m for t in gpu_ids) for m in composed) == [1, 2]
            # Every event from the composition on names the machine.
            await until(
                lambda: all(client.states[t] and client.states[t][-1].state == "done" for t in gpu_ids),
                20,
                "the done states",
            )
            for tid in gpu_ids:
                states = client.states[tid]
                assert [s.state for s in states] == ["queued", "running", "done"]
                assert {s.machine for s in states[1:]} == {results[tid].machine}

            # A task that fits the site runs there, without a composition.
            assert results[cpu_id].status == "done" and results[cpu_id].machine == socket.gethostname()
            assert results[cpu_id].result and results[cpu_id].result["cuda_visible_devices"] == []
            # Nothing fits 8 GPUs: the job failed with the composer's reason (once: no retry), agent unharmed.
            huge = results[huge_id]
            assert huge.status == "failed" and huge.attempts == 1
            assert "needs 8 GPU(s), the site offers 0" in (huge.error or "")
            # The composer's words depend on what is busy at that moment (2 machines may hold every device).
            assert re.search(r"can be composed for it: need (1 cores, )?8 gpu", huge.error or ""), huge.error

            # Freed after the idle timeout: pools back to full, counted in the audit log.
            await until(lambda: composer.pools().used() == 0, 30, "the machines to be freed")
            audit = composer.audit()
            ok = [(e.action, e.machine_id) for e in audit if e.outcome == "ok"]
            assert sorted(ok) == sorted([("compose", m) for m in composed] + [("free", m) for m in composed])
            assert {e.user for e in audit} == {AGENT_USER}
            refused = [e for e in audit if e.action == "compose" and e.outcome == "failed"]
            assert len(refused) == 1 and re.search(r"need (1 cores, )?8 gpu", refused[0].detail)
            for m in composer.list(all=True):
                assert m.state is MachineState.FREED
                last = max(results[t].finished_at for t in gpu_ids if results[t].machine == m.id)
                assert m.freed_at is not None and (m.freed_at - last).total_seconds() >= IDLE_S - 0.5
            pools = composer.pools()
            assert (pools.free("gpu"), pools.free("cpu")) == (4, 2)
            assert all(len(client.results[t]) == 1 for t in [*gpu_ids, cpu_id, huge_id])
    finally:
        assert cloud.stop(grace=20) == 0, cloud.log_tail()
        assert site.proc.stop(grace=20) == 0, site.proc.log_tail()
        if composer is not None:
            composer.close()
