"""`reflexarc site run` as a real process: SIGKILL mid-job, restart, every result exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.process import ManagedProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

APPS = "reflexarc.hpc_bridge.examples.apps"


def write_site(tmp_path: Path, kafka: KafkaSettings) -> Path:
    """site.yaml for a subprocess agent on the test broker."""
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": "crashy",
                "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
                "state_dir": str(tmp_path / "state"),
                "engine": {"kind": "local", "local": {"max_workers": 2}},
                "apps": {"sleep": {"function": f"{APPS}:sleep", "retries": 0, "on_failure": "ignore"}},
            }
        )
    )
    return path


def start_agent(site: Path, log: Path) -> ManagedProcess:
    """The site agent as its own process, exactly as `reflexarc site run` runs it."""
    argv = [sys.executable, "-c", "from reflexarc.hpc_bridge.cli import site_app; site_app()", "run", str(site)]
    return ManagedProcess("site", argv, log).start()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def test_kill9_mid_job_restart_publishes_each_result_once(tmp_path: Path, kafka_settings: KafkaSettings) -> None:
    site = write_site(tmp_path, kafka_settings)
    marks = tmp_path / "marks"
    n = 40
    ids = [f"c-{i:03d}" for i in range(n)]
    reqs = [
        TaskRequest(task_id=t, app="sleep", site="crashy", args={"seconds": 0.25, "marker_dir": str(marks), "tag": t})
        for t in ids
    ]
    agent = start_agent(site, tmp_path / "site.log")
    kills = 0
    try:
        async with SiteClient(kafka_settings) as client:
            await client.submit(reqs)
            for threshold in (6, 18, 30):
                deadline = time.monotonic() + 60
                while len(client.results) < threshold:
                    assert time.monotonic() < deadline, f"stuck at {len(client.results)} results:\n{agent.log_tail()}"
                    assert agent.running(), agent.log_tail()
                    await asyncio.sleep(0.05)
                running_pids = {int(p.read_text()) for p in marks.iterdir()}
                agent.kill()  # SIGKILL, mid-job: two tasks are sleeping in workers
                kills += 1
                # Its workers die with it (PR_SET_PDEATHSIG), so nothing runs unobserved.
                deadline = time.monotonic() + 10
                while any(alive(p) for p in running_pids):
                    assert time.monotonic() < deadline, "workers outlived the killed agent"
                    time.sleep(0.05)
                agent = start_agent(site, tmp_path / "site.log")
            await client.wait_results(ids, 90)
            await asyncio.sleep(2.0)  # time for a (wrong) duplicate to show up
            counts = Counter({t: len(client.results[t]) for t in ids})
            assert set(counts.values()) == {1}, {t: c for t, c in counts.items() if c != 1}
            assert all(client.results[t][0].status == "done" for t in ids)
            runs = Counter(p.name.split(".")[0] for p in marks.iterdir())
            assert set(runs) == set(ids)
            # Only tasks interrupted by a kill ran again (at most two in flight per kill).
            assert sum(runs.values()) - n <= 2 * kills, runs
        # Clean stop on SIGTERM.
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None
        assert agent.proc.wait(30) == 0, agent.log_tail()
    finally:
        agent.stop()
    assert "Traceback" not in (tmp_path / "site.log").read_text()
    assert not [p for p in (int(m.read_text()) for m in marks.iterdir()) if alive(p) and p != os.getpid()]


def test_site_run_rejects_bad_config_with_file_and_line(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("site: hpc\napps:\n  a:\n    function: 'no colon here'\n")
    out = subprocess.run(
        [sys.executable, "-c", "from reflexarc.hpc_bridge.cli import site_app; site_app()", "run", str(site)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"{site}:4:" in out.stderr and "package.module:function" in out.stderr
