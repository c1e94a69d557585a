"""2,000 trivial tasks through one site agent process, SIGKILLed once in the middle: each ends exactly once.

Counted on Kafka (real Tansu), not in the agent: after the restarted agent
has stopped cleanly, both topics are read from the start up to sentinels
written behind everything the agents published (``kafka_tally``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kafka_tally import read_all
from test_hpc_site_crash import alive

from reflexarc.config import KafkaSettings
from reflexarc.envelope import EnvelopeError, EventType
from reflexarc.events import JobState, TaskRequest, TaskResult
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.states import FINISHED, JobStatus
from reflexarc.kafka import event_of
from reflexarc.testing.tiers import TierProcess
from reflexarc.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

APPS = "reflexarc.hpc_bridge.examples.apps"
N = 2000
WORKERS = 2


def write_site(tmp_path: Path, kafka: KafkaSettings) -> Path:
    """site.yaml: the local engine, one app that leaves a marker file each time it starts."""
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": "burst",
                "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
                "state_dir": str(tmp_path / "state"),
                "engine": {"kind": "local", "local": {"max_workers": WORKERS}},
                "apps": {"mark": {"function": f"{APPS}:sleep", "retries": 0, "on_failure": "ignore"}},
            }
        )
    )
    return path


def worker_pids(agent_pid: int) -> set[int]:
    """The agent's child processes (its local engine's workers)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == agent_pid:
                        found.add(int(entry))
            except OSError:
                continue
    return found


async def until(check: Callable[[], bool], timeout: float, what: str, agent: TierProcess) -> None:
    """Poll ``check()`` (a running agent is watched through Kafka) until true; fail with the agent's log."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s:\n{agent.text()[-3000:]}"
        await asyncio.sleep(0.05)


async def tally(kafka: KafkaSettings) -> tuple[Counter[str], Counter[str], dict[str, str]]:
    """Results and final job states on Kafka, counted per task; each task's result status."""
    topics = Topics()
    results: Counter[str] = Counter()
    finals: Counter[str] = Counter()
    status: dict[str, str] = {}
    for r in await read_all(kafka, [topics.kafka_results, topics.kafka_jobs]):
        try:
            env = event_of(r)
        except EnvelopeError:
            continue
        if env.type == EventType.TASK_RESULT.value:
            res = TaskResult.from_envelope(env)
            results[res.task_id] += 1
            status[res.task_id] = res.status
        elif env.type == EventType.JOB_STATE.value:
            st = JobState.from_envelope(env)
            if JobStatus(st.state) in FINISHED:
                finals[st.task_id] += 1
    return results, finals, status


async def test_kill9_in_a_burst_of_2000_each_task_ends_exactly_once(
    tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    site = write_site(tmp_path, kafka_settings)
    marks = tmp_path / "marks"
    ids = [f"b-{i:04d}" for i in range(N)]
    reqs = [
        TaskRequest(task_id=t, app="mark", site="burst", args={"seconds": 0, "marker_dir": str(marks), "tag": t})
        for t in ids
    ]
    log = tmp_path / "site.log"
    agent = TierProcess("site", site, log)
    await agent.start()
    try:
        async with SiteClient(kafka_settings) as client:
            await client.submit(reqs)
            await until(lambda: len(client.results) >= N // 2, 120, "half of the results", agent)
            assert agent.pid is not None
            workers = worker_pids(agent.pid)
            agent.kill()  # SIGKILL in the middle of the burst
            # Its workers die with it (PR_SET_PDEATHSIG): nothing runs on unobserved.
            deadline = time.monotonic() + 10
            while any(alive(p) for p in workers):
                assert time.monotonic() < deadline, "workers outlived the killed agent"
                await asyncio.sleep(0.05)
            killed_at = len(client.results)
            assert killed_at < N, "the burst was over before the kill"
            agent = TierProcess("site", site, log)
            await agent.start()
            await client.wait_results(ids, 180)
        assert agent.proc.proc is not None
        agent.proc.signal(signal.SIGTERM)  # a clean stop publishes what is pending, then exits 0
        assert agent.proc.proc.wait(60) == 0, agent.text()[-3000:]
    finally:
        agent.stop()

    results, finals, status = await tally(kafka_settings)
    assert set(results) == set(ids) and set(results.values()) == {1}, {t: c for t, c in results.items() if c != 1}
    assert set(finals) == set(ids) and set(finals.values()) == {1}, {t: c for t, c in finals.items() if c != 1}
    assert set(status.values()) == {"done"}
    # Nothing that finished ran again: only the attempts running at the kill (one per worker) may have.
    runs = Counter(p.name.split(".")[0] for p in marks.iterdir())
    assert set(runs) == set(ids)
    assert sum(runs.values()) - N <= WORKERS, {t: c for t, c in runs.items() if c > 1}
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    print(
        f"killed with {killed_at} of {N} results published; {sum(runs.values()) - N} task(s) ran again", file=sys.stderr
    )
