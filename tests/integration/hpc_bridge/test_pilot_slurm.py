"""Pilot engines (dask-jobqueue, Parsl HTEX) on one real Slurm shared by this module's tests.

Warm pilots through the real site agent and Tansu, elastic allocations and the
wall-time rule, MPI (mpi4py) through a pilot and as a batch job, GPU requests,
bad configuration, ``site status --json``, and a SIGKILLed agent leaving no
Slurm job orphaned.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from reflexarc.config import KafkaSettings
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.allocations import read_status
from reflexarc.hpc_bridge.apps import MpiSpec, mpi_argv
from reflexarc.hpc_bridge.cli import site_app
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.engines import EngineError, make_engine
from reflexarc.hpc_bridge.engines.pilot import PilotEngine, PilotExecution
from reflexarc.hpc_bridge.site_config import EngineSettings, SiteConfig
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.process import ManagedProcess
from reflexarc.testing.slurm import SlurmCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

APPS = "reflexarc.hpc_bridge.examples.apps"
ROOT_MPI = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
HELLO_MPI = """
import json, os
from mpi4py import MPI
comm = MPI.COMM_WORLD
sizes = comm.gather(comm.Get_size(), root=0)
if comm.Get_rank() == 0:
    print(json.dumps({"size": comm.Get_size(), "ranks": len(sizes), "job": os.environ.get("SLURM_JOB_ID")}))
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One Slurm for every pilot test: 8 CPUs, 2 (fake) GPUs, and a partition with a 10 min MaxTime."""
    cluster = SlurmCluster(
        tmp_path_factory.mktemp("slurm"),
        cpus=8,
        memory_mb=16000,
        gres={"gpu": 2},
        extra_config="PartitionName=short Nodes=ALL MaxTime=00:10:00 State=UP",
    )
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def empty_queue(slurm: SlurmCluster) -> Iterator[None]:
    """Each test starts and ends with an empty queue (a failed test leaves nothing for the next)."""
    slurm.cancel_all()
    yield
    slurm.cancel_all()


def pilot_settings(slurm: SlurmCluster, **over: Any) -> dict[str, Any]:
    """Pilot settings that start fast on the test Slurm."""
    return {
        "cores_per_node": 2,
        "max_allocations": 2,
        "walltime": "00:10:00",
        "idle_timeout_s": 3,
        "queue_poll_s": 1,
        "poll_interval_s": 0.2,
        "env": {"SLURM_CONF": str(slurm.conf_path)},
        **over,
    }


def engine_section(kind: str, pilot: dict[str, Any]) -> dict[str, Any]:
    """The ``engine:`` section of site.yaml for a pilot of ``kind``."""
    if kind == "dask":
        return {"kind": "dask", "dask": {"jobqueue": pilot}}
    return {"kind": "parsl", "parsl": {"heartbeat_s": 2, **pilot}}  # a killed worker is replaced within 2 s


def squeue_ids(slurm: SlurmCluster) -> set[str]:
    """Job ids Slurm lists now."""
    return set(slurm.job_ids())


def live_allocations(state_dir: Path) -> dict[str, str]:
    """job id -> state of the allocations the site reports as not released."""
    status = read_status(state_dir) or {}
    return {
        a["job_id"]: a["state"] for a in status.get("allocations", []) if a.get("job_id") and a["state"] != "released"
    }


async def until(check: Any, timeout: float, what: str, log: ManagedProcess | None = None) -> None:
    """Wait until ``check()`` is truthy (polling a real process or scheduler)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f":\n{log.log_tail(40)}" if log else "")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["dask", "parsl"])
async def test_pilot_site_runs_200_tasks_grows_and_releases(
    kind: str, tmp_path: Path, kafka_settings: KafkaSettings, slurm: SlurmCluster
) -> None:
    state = tmp_path / "state"
    cfg = SiteConfig.model_validate(
        {
            "site": f"pilot-{kind}",
            "kafka": kafka_settings.model_dump(),
            "state_dir": str(state),
            "engine": engine_section(kind, pilot_settings(slurm)),
            "apps": {"add": {"function": f"{APPS}:add", "timeout_s": 30}},
        }
    )
    site_file = tmp_path / "site.yaml"
    site_file.write_text(yaml.safe_dump({"site": cfg.site, "state_dir": str(state), "apps": {}}))
    stop = asyncio.Event()
    run = asyncio.create_task(SiteAgent(cfg).run(stop))
    ids = [f"{kind}-{i:03d}" for i in range(200)]
    try:
        async with SiteClient(kafka_settings) as client:
            await client.submit(
                [TaskRequest(task_id=t, app="add", args={"a": i, "b": 1}, site=cfg.site) for i, t in enumerate(ids)]
            )
            # A backlog of 200 one-slot tasks is more than one allocation (2 slots): a second one is asked for,
            # and squeue shows exactly the allocations the site reports.
            await until(lambda: len(live_allocations(state)) == 2, 60, "two allocations")
            assert set(live_allocations(state)) == squeue_ids(slurm)
            listed = json.loads(CliRunner().invoke(site_app, ["status", str(site_file), "--json"]).stdout)
            assert {a["job_id"] for a in listed["allocations"] if a["state"] != "released"} == squeue_ids(slurm)
            assert listed["agent_running"] and listed["engine"] == kind
            res = await client.wait_results(ids, 90)
            assert all(res[f"{kind}-{i:03d}"].result == {"sum": i + 1} for i in range(200))
            await asyncio.sleep(0.5)  # time for a (wrong) duplicate to arrive
            assert Counter(len(client.results[t]) for t in ids) == Counter({1: 200})
            terminal = Counter(
                sum(1 for s in client.states[t] if s.state in ("done", "failed", "timed_out", "cancelled")) for t in ids
            )
            assert terminal == Counter({1: 200})
            # Each task's states name the allocation and the worker it ran on.
            running = [s for t in ids for s in client.states[t] if s.state == "running"]
            assert len(running) == 200 and all(s.machine and "/" in s.machine for s in running)
            used = {s.machine.split("/")[0] for s in running if s.machine}
            assert len(used) == 2, used
            # Idle for idle_timeout_s: both released, squeue empty.
            await until(lambda: not squeue_ids(slurm) and not live_allocations(state), 30, "idle release")
            status = read_status(state) or {}
            released = [a for a in status["allocations"] if a["name"] in used]
            assert len(released) == 2 and all(a["state"] == "released" and "idle for" in a["reason"] for a in released)
            assert any("backlog" in d and "requesting allocation 2 of 2" in d for d in status["decisions"])
    finally:
        stop.set()
        await asyncio.wait_for(run, 60)
    await until(lambda: not squeue_ids(slurm), 20, "an empty queue (scancel'ed jobs leave it)")


def spec_for(tmp_path: Path, task: str, **kw: Any) -> RunSpec:
    """A RunSpec as the agent builds it."""
    work = tmp_path / task
    return RunSpec(
        task_id=task, attempt=1, workdir=str(work), result_path=str(work / "outcome.json"), **{"kind": "python", **kw}
    )


async def started(kind: str, slurm: SlurmCluster, tmp_path: Path, **over: Any) -> PilotEngine:
    """A pilot engine of ``kind``, started."""
    engine = make_engine(
        EngineSettings.model_validate(engine_section(kind, pilot_settings(slurm, **over))),
        str(tmp_path / "state" / "work"),
        "test",
    )
    assert isinstance(engine, PilotEngine)
    await engine.start()
    return engine


async def test_pilot_walltime_rule(tmp_path: Path, slurm: SlurmCluster) -> None:
    """An allocation with 90 s left takes a 30 s task but not a 120 s task, which runs on a new allocation."""
    engine = await started(
        "dask",
        slurm,
        tmp_path,
        walltime="00:03:00",
        min_allocations=1,
        idle_timeout_s=600,
        walltime_margin_s=10,
        drain_s=20,
    )
    try:
        manager = engine.manager
        assert manager is not None
        warm = await engine.submit(
            spec_for(tmp_path, "warm", function=f"{APPS}:add", args={"a": 1, "b": 2}, timeout_s=5)
        )
        assert (await warm.wait()).result == {"sum": 3}
        a1 = next(iter(manager.allocations.values()))
        # Slurm counts time limits in minutes: shorten the allocation to 2 min, then wait for 90 s left.
        slurm.run("scontrol", "update", f"JobId={a1.job_id}", "TimeLimit=2")
        await until(lambda: (a1.remaining(time.time()) or 999) <= 90, 60, "90 s left on the first allocation")
        short = await engine.submit(spec_for(tmp_path, "short", function=f"{APPS}:devices", timeout_s=30))
        long = await engine.submit(spec_for(tmp_path, "long", function=f"{APPS}:devices", timeout_s=120))
        assert isinstance(short, PilotExecution) and isinstance(long, PilotExecution)
        assert short.running and short.allocation == a1.name  # placed at once: 90 >= 30 + 10
        assert not long.running  # 90 < 120 + 10: waits for a new allocation
        out_short, out_long = await asyncio.wait_for(asyncio.gather(short.wait(), long.wait()), 60)
        assert out_short.result and out_short.result["slurm_job_id"] == a1.job_id
        assert long.allocation != a1.name and long.job_id != a1.job_id
        assert out_long.result and out_long.result["slurm_job_id"] == long.job_id
        assert any(
            "need more wall time than any running allocation has left (timeout 120s" in d for d in manager.decisions
        )
        assert {a1.job_id, long.job_id} <= squeue_ids(slurm)
    finally:
        await engine.close()
    await until(lambda: not squeue_ids(slurm), 20, "an empty queue (scancel'ed jobs leave it)")


@pytest.mark.parametrize(("kind", "launcher"), [("dask", "mpirun"), ("parsl", "srun"), ("batch", "mpirun")])
async def test_pilot_mpi_app_reports_two_ranks_inside_the_allocation(
    kind: str, launcher: str, tmp_path: Path, slurm: SlurmCluster
) -> None:
    hello = tmp_path / "hello.py"
    hello.write_text(HELLO_MPI)
    args = ["--mpi=pmix"] if launcher == "srun" else ["--oversubscribe"]
    argv = mpi_argv(MpiSpec(ranks=2, launcher=launcher, launcher_args=args), [sys.executable, str(hello)])
    spec = spec_for(tmp_path, "mpi", kind="mpi", argv=argv, ranks=2, timeout_s=60, environment=ROOT_MPI)
    if kind == "batch":
        engine = make_engine(
            EngineSettings.model_validate({"kind": "batch", "batch": {"env": {"SLURM_CONF": str(slurm.conf_path)}}}),
            str(tmp_path / "work"),
        )
        await engine.start()
    else:
        engine = await started(kind, slurm, tmp_path)
    try:
        ex = await engine.submit(spec)
        out = await asyncio.wait_for(ex.wait(), 90)
        assert out.status.value == "done", out.error
        assert out.result is not None
        report = out.result["output"]
        job = getattr(ex, "job_id", None) or ex.native_id
        assert report == {"size": 2, "ranks": 2, "job": job}
        if isinstance(ex, PilotExecution):
            assert ex.placement is None  # released
            assert ex.need.slots == 2  # both ranks' cores were reserved in the allocation
    finally:
        await engine.close()


async def test_pilot_gpu_requests_get_their_own_devices(tmp_path: Path, slurm: SlurmCluster) -> None:
    engine = await started("dask", slurm, tmp_path, gpus_per_node=2, max_allocations=1)
    try:
        specs = [
            spec_for(tmp_path, f"g{i}", function=f"{APPS}:devices", args={"hold_s": 1.5}, gpus=1, timeout_s=30)
            for i in range(2)
        ]
        execs = [await engine.submit(s) for s in specs]
        outs = await asyncio.wait_for(asyncio.gather(*(e.wait() for e in execs)), 60)
        assert all(o.status.value == "done" for o in outs), [o.error for o in outs]
        seen = [o.result["cuda_visible_devices"] for o in outs if o.result]
        # One GPU each, different ones, out of the two Slurm gave the allocation; the tasks overlapped.
        assert sorted(len(s) for s in seen) == [1, 1] and seen[0] != seen[1]
        starts = sorted(o.started_at for o in outs if o.started_at)
        ends = sorted(o.finished_at for o in outs if o.finished_at)
        assert starts[1] < ends[0]
        backend: Any = engine.backend
        info = await backend.client.scheduler.identity()
        resources = [ws["resources"] for ws in info["workers"].values()]
        assert resources and all(r.get("GPU") == 2 for r in resources)
    finally:
        await engine.close()


@pytest.mark.parametrize("kind", ["dask", "parsl"])
async def test_pilot_cancel_stops_the_running_task_and_the_slot_is_reused(
    kind: str, tmp_path: Path, slurm: SlurmCluster
) -> None:
    """What a timeout or `jobs cancel` does: the task's process really stops; the next task runs there.

    A task queued at the same (one-slot) worker behind the cancelled one is not lost with it: it runs once.
    """
    engine = await started(kind, slurm, tmp_path, cores_per_node=1, max_allocations=1)
    marks = tmp_path / "marks"
    after = tmp_path / "after"
    try:
        ex = await engine.submit(
            spec_for(
                tmp_path,
                "victim",
                function=f"{APPS}:sleep",
                timeout_s=60,
                args={"seconds": 60, "marker_dir": str(marks), "tag": "v"},
            )
        )
        waiter = asyncio.ensure_future(ex.wait())
        await until(lambda: marks.exists() and any(marks.iterdir()), 60, "the task to start")
        pid = int(next(marks.iterdir()).read_text())
        behind = await engine.submit(
            spec_for(
                tmp_path,
                "behind",
                function=f"{APPS}:sleep",
                timeout_s=30,
                args={"seconds": 0, "marker_dir": str(after), "tag": "b"},
            )
        )
        assert isinstance(behind, PilotExecution) and isinstance(ex, PilotExecution)
        # Queued at the busy worker (prefetched), not running: its timeout has not started.
        assert behind.remote is not None and not behind.running and behind.worker == ex.worker
        behind_out = asyncio.ensure_future(behind.wait())
        await ex.cancel()
        out = await asyncio.wait_for(waiter, 20)
        assert out.status.value == "cancelled"
        await until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"the task's process {pid} to be killed")
        done = await asyncio.wait_for(behind_out, 60)
        assert done.status.value == "done", done.error
        assert len(list(after.iterdir())) == 1  # ran exactly once
        nxt = await engine.submit(
            spec_for(tmp_path, "next", function=f"{APPS}:add", args={"a": 1, "b": 1}, timeout_s=30)
        )
        assert (await asyncio.wait_for(nxt.wait(), 60)).result == {"sum": 2}
        assert isinstance(nxt, PilotExecution) and isinstance(ex, PilotExecution)
        assert nxt.allocation == ex.allocation  # the same (single-slot) allocation, its worker replaced
    finally:
        await engine.close()


async def test_pilot_bad_configuration_names_the_field(tmp_path: Path, slurm: SlurmCluster) -> None:
    # A walltime longer than the partition allows: refused before any sbatch.
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "site": "badwall",
                "state_dir": str(tmp_path / "state"),
                "apps": {"add": {"function": f"{APPS}:add"}},
                "engine": engine_section("parsl", pilot_settings(slurm, partition="short", walltime="01:00:00")),
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "reflexarc", "site", "check", str(site)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stdout + out.stderr  # a problem found (check verbs: 0 ok / 1 problems / 2 cannot)
    assert "engine.parsl.walltime: 01:00:00 is longer than partition short's MaxTime" in out.stderr
    # An address that is not this host's.
    with pytest.raises(EngineError, match=r"engine\.dask\.jobqueue\.address: '10\.254\.254\.254' is not an address"):
        await started("dask", slurm, tmp_path, address="10.254.254.254")
    await until(lambda: not squeue_ids(slurm), 20, "an empty queue (scancel'ed jobs leave it)")


def write_site(tmp_path: Path, kafka: KafkaSettings, slurm: SlurmCluster, kind: str) -> Path:
    """site.yaml of a pilot site run as its own process."""
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": f"crash-{kind}",
                "kafka": {"bootstrap_servers": kafka.bootstrap_servers},
                "state_dir": str(tmp_path / "state"),
                "engine": engine_section(
                    kind, pilot_settings(slurm, cores_per_node=4, max_allocations=1, idle_timeout_s=60)
                ),
                "apps": {"sleep": {"function": f"{APPS}:sleep", "timeout_s": 30, "retries": 1}},
            }
        )
    )
    return path


def start_agent(site: Path, log: Path) -> ManagedProcess:
    """`reflexarc site run site.yaml` as its own process."""
    return ManagedProcess("site", [sys.executable, "-m", "reflexarc", "site", "run", str(site)], log).start()


def interchanges_of(pid: int) -> list[int]:
    """Parsl interchange processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"high_throughput.interchange" in cmd or b"HTEX interchange" in cmd) and int(
            stat.rsplit(") ", 1)[1].split()[1]
        ) == pid:
            out.append(int(entry.name))
    return out


@pytest.mark.parametrize("kind", ["dask", "parsl"])
async def test_pilot_agent_sigkill_restart_each_task_once_no_orphan_job(
    kind: str, tmp_path: Path, kafka_settings: KafkaSettings, slurm: SlurmCluster
) -> None:
    site = write_site(tmp_path, kafka_settings, slurm, kind)
    state = tmp_path / "state"
    marks = tmp_path / "marks"
    ids = [f"k-{i:02d}" for i in range(20)]
    reqs = [
        TaskRequest(
            task_id=t, app="sleep", site=f"crash-{kind}", args={"seconds": 0.5, "marker_dir": str(marks), "tag": t}
        )
        for t in ids
    ]
    agent = start_agent(site, tmp_path / "site.log")
    try:
        async with SiteClient(kafka_settings) as client:
            await client.submit(reqs)
            # Kill it while its allocation runs tasks.
            await until(
                lambda: len(client.results) >= 2 and marks.exists() and len(list(marks.iterdir())) >= 6,
                90,
                "tasks running in the allocation",
                agent,
            )
            old_jobs = set(live_allocations(state))
            assert len(old_jobs) == 1 and old_jobs <= squeue_ids(slurm)
            old_pid = agent.pid
            assert old_pid is not None
            helpers = interchanges_of(old_pid)
            agent.kill()
            if kind == "parsl":
                assert helpers
                await until(
                    lambda: not any(Path(f"/proc/{p}").exists() for p in helpers),
                    10,
                    "the interchange to die with the agent",
                )
            agent = start_agent(site, tmp_path / "site.log")
            # The new agent cancels the old allocation by job id (unless its workers, having lost their
            # scheduler or interchange, ended it already) and takes a new one.
            await until(lambda: not (old_jobs & squeue_ids(slurm)), 30, "the old allocation to be gone")
            await client.wait_results(ids, 120)
            await asyncio.sleep(0.5)  # time for a (wrong) duplicate to arrive
            assert Counter(len(client.results[t]) for t in ids) == Counter({1: 20})
            assert all(client.results[t][0].status == "done" for t in ids)
            terminal = Counter(
                sum(1 for s in client.states[t] if s.state in ("done", "failed", "timed_out", "cancelled")) for t in ids
            )
            assert terminal == Counter({1: 20})
            # squeue holds no job the site does not know about, and the site reports the old one released.
            assert squeue_ids(slurm) <= set(live_allocations(state))
            status = read_status(state) or {}
            old = [a for a in status["allocations"] if a["job_id"] in old_jobs]
            assert old and old[0]["state"] == "released" and "previous agent process" in old[0]["reason"], old
        agent.signal(signal.SIGTERM)
        assert agent.proc is not None and agent.proc.wait(60) == 0, agent.log_tail()
    finally:
        agent.stop()
    await until(lambda: not squeue_ids(slurm), 20, "an empty queue (scancel'ed jobs leave it)")
    assert "Traceback" not in (tmp_path / "site.log").read_text()
