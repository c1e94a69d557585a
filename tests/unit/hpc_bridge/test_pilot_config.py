"""Pilot settings, the workers' address, Slurm times, MPI layout, job scripts and `site status` (no scheduler)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from reflexarc.config import ConfigError, parse_yaml
from reflexarc.hpc_bridge.apps import MpiSpec, mpi_argv
from reflexarc.hpc_bridge.cli import site_app
from reflexarc.hpc_bridge.engines import EngineError, make_engine
from reflexarc.hpc_bridge.engines.jobqueue import _job_class, allocation_of, job_kwargs
from reflexarc.hpc_bridge.engines.network import resolve_address
from reflexarc.hpc_bridge.engines.pilot import PilotEngine, need_of
from reflexarc.hpc_bridge.engines.pilot_worker import prepare
from reflexarc.hpc_bridge.engines.slurm_queue import parse_slurm_time
from reflexarc.hpc_bridge.site_config import (
    EngineSettings,
    JobqueueSettings,
    ParslEngineSettings,
    PilotSettings,
    SiteConfig,
    walltime_seconds,
)
from reflexarc.hpc_bridge.worker import RunSpec

APPS = "reflexarc.hpc_bridge.examples.apps"


def test_walltime_and_pilot_settings_are_checked() -> None:
    assert walltime_seconds("01:30:00") == 5400 and walltime_seconds("1-00:00:00") == 86400
    for bad in ("90", "1:70:00", "00:00:00"):
        with pytest.raises(ValueError):
            walltime_seconds(bad)
    with pytest.raises(ValidationError, match="min_allocations"):
        PilotSettings(min_allocations=3, max_allocations=2)
    with pytest.raises(ValidationError, match="either 'address' or 'interface'"):
        PilotSettings(address="127.0.0.1", interface="lo")
    with pytest.raises(ValidationError, match="launcher: single"):
        ParslEngineSettings(launcher="single", nodes_per_allocation=2)
    assert ParslEngineSettings(cores_per_node=8, cores_per_worker=2).slots_per_allocation == 4


def test_dask_jobqueue_section_alone_means_a_pilot_cluster_with_jobqueue_names() -> None:
    e = EngineSettings.model_validate(
        {"kind": "dask", "dask": {"jobqueue": {"cores": 4, "queue": "debug", "memory": "8GB"}}}
    )
    assert e.dask.cluster == "jobqueue" and e.pilot is e.dask.jobqueue
    assert isinstance(e.pilot, JobqueueSettings)
    assert (e.pilot.cores_per_node, e.pilot.partition, e.pilot.memory_per_node) == (4, "debug", "8GB")
    assert e.pilot_field() == "engine.dask.jobqueue"
    with pytest.raises(ValidationError, match="jobqueue pilots scale with"):
        EngineSettings.model_validate({"kind": "dask", "dask": {"jobqueue": {}, "adapt": {"maximum": 2}}})
    assert EngineSettings.model_validate({"kind": "dask"}).pilot is None


def test_mpi_ranks_larger_than_the_allocation_name_the_field() -> None:
    text = f"""
site: hpc
engine: {{kind: parsl, parsl: {{cores_per_node: 4, nodes_per_allocation: 1}}}}
apps:
  ok: {{argv: [./sim], mpi: {{ranks: 4}}}}
  sim: {{argv: [./sim], mpi: {{ranks: 8, launcher: srun}}}}
  add: {{function: "{APPS}:add"}}
"""
    with pytest.raises(ConfigError) as err:
        parse_yaml(text, SiteConfig, "site.yaml")
    assert "apps.sim.mpi.ranks: 8 ranks (4 per node) need 2 node(s): larger than the allocation" in str(err.value)
    assert "engine.parsl" in str(err.value)
    with pytest.raises(ConfigError, match=r"apps\.sim\.mpi\.ranks_per_node"):
        parse_yaml(text.replace("ranks: 8, launcher: srun", "ranks: 2, ranks_per_node: 6"), SiteConfig, "site.yaml")
    # Two nodes per allocation hold it; a batch site is not limited by a pilot's size.
    parse_yaml(text.replace("nodes_per_allocation: 1", "nodes_per_allocation: 2"), SiteConfig, "site.yaml")
    parse_yaml(text.replace("kind: parsl", "kind: batch"), SiteConfig, "site.yaml")


def test_workers_address_must_be_of_this_host() -> None:
    assert resolve_address(None, None, "engine.parsl") == "127.0.0.1"
    assert resolve_address("127.0.0.1", None, "engine.parsl") == "127.0.0.1"
    assert resolve_address("localhost", None, "engine.parsl") == "localhost"
    assert resolve_address(None, "lo", "engine.parsl") == "127.0.0.1"
    with pytest.raises(
        EngineError,
        match=r"engine\.parsl\.address: '10\.254\.254\.254' is not an address of this "
        r"host .*its interfaces: .*lo 127\.0\.0\.1",
    ):
        resolve_address("10.254.254.254", None, "engine.parsl")
    with pytest.raises(EngineError, match=r"engine\.dask\.jobqueue\.interface: 'ib9' is not a network interface"):
        resolve_address(None, "ib9", "engine.dask.jobqueue")


def test_slurm_durations() -> None:
    assert parse_slurm_time("1:29") == 89
    assert parse_slurm_time("1:00:00") == 3600
    assert parse_slurm_time("2-00:00:01") == 172801
    assert parse_slurm_time("2-12") == 216000
    assert parse_slurm_time("UNLIMITED") is None and parse_slurm_time("INVALID") is None


def test_mpi_launchers() -> None:
    assert mpi_argv(MpiSpec(ranks=4, ranks_per_node=2, launcher="srun"), ["./sim"]) == [
        "srun",
        "--ntasks=4",
        "--ntasks-per-node=2",
        "./sim",
    ]
    assert mpi_argv(MpiSpec(ranks=4, ranks_per_node=2), ["./sim"]) == ["mpirun", "-n", "4", "--npernode", "2", "./sim"]
    assert mpi_argv(MpiSpec(ranks=4, ranks_per_node=2, launcher="mpiexec"), ["./sim"])[3:5] == ["-ppn", "2"]


def spec(**kw: Any) -> RunSpec:
    """A RunSpec with the given fields."""
    return RunSpec(task_id="t", attempt=1, workdir="/tmp/w", result_path="/tmp/w/o.json", **{"kind": "python", **kw})


def test_what_a_task_needs_from_an_allocation() -> None:
    s = PilotSettings(cores_per_node=8, nodes_per_allocation=2)
    assert need_of(spec(cpus=3, timeout_s=60), s, "k") == need_of(spec(cpus=3, timeout_s=60), s, "k")
    n = need_of(spec(cpus=3, timeout_s=60), s, "k")
    assert (n.slots_per_node, n.nodes, n.timeout_s) == (3, 1, 60)
    mpi = need_of(spec(kind="mpi", ranks=12, cpus=1), s, "m")  # as many per node as fit: 8 + 4
    assert (mpi.slots_per_node, mpi.nodes) == (8, 2)
    spread = need_of(spec(kind="mpi", ranks=4, ranks_per_node=2, cpus=2), s, "m")
    assert (spread.slots_per_node, spread.nodes) == (4, 2)
    parsl = need_of(spec(cpus=4), ParslEngineSettings(cores_per_node=8, cores_per_worker=2), "p")
    assert parsl.slots_per_node == 2  # two 2-core workers


def test_the_worker_applies_gpus_and_mpi_step_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    s = prepare(spec(function="m:f"), [1, 2])
    assert s.environment["CUDA_VISIBLE_DEVICES"] == "5,6" and s.isolate
    assert not prepare(spec(function="m:f"), []).isolate
    monkeypatch.setenv("SLURM_LABELIO", "1")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1024")
    m = prepare(spec(kind="mpi", argv=["srun", "--ntasks=2", "./sim"]), [])
    assert m.environment["SLURM_OVERLAP"] == "1" and m.environment["SLURM_MEM_PER_CPU"] == "0"
    assert (
        m.argv is not None
        and m.argv[:3] == ["env", "-u", "SLURM_LABELIO"]
        and m.argv[-3:] == ["srun", "--ntasks=2", "./sim"]
    )


def test_dask_job_script_for_gpus_and_several_nodes(tmp_path: Path) -> None:
    s = JobqueueSettings(
        cores_per_node=4,
        nodes_per_allocation=2,
        gpus_per_node=2,
        partition="gpu",
        worker_init=["module load cuda"],
        walltime="00:30:00",
    )
    name = "rxp-abc123-a7"
    job = _job_class()(nodes=2, **job_kwargs(s, "tcp://10.0.0.1:8786", name, tmp_path))
    script = job.job_script()
    for line in (
        "#SBATCH -J rxp-abc123-a7",
        "#SBATCH --nodes=2",
        "#SBATCH --gres=gpu:2",
        "#SBATCH -p gpu",
        "#SBATCH -t 00:30:00",
        "module load cuda",
    ):
        assert line in script, script
    assert "#SBATCH -n 1" not in script and "--mem" not in script.split("dask_worker")[0]
    assert "srun --nodes=2 --ntasks-per-node=1 bash -c" in script and "--name rxp-abc123-a7-n$SLURM_NODEID" in script
    assert "--resources GPU=2" in script and "--nworkers 4" in script
    assert allocation_of("rxp-abc123-a7-n1-3") == name and allocation_of("rxp-abc123-a7") == name
    assert allocation_of("some-other-worker") is None


def test_make_engine_builds_pilot_engines(tmp_path: Path) -> None:
    for section in (
        {"kind": "parsl"},
        {"kind": "dask", "dask": {"jobqueue": {"max_allocations": 3, "cores_per_node": 2}}},
    ):
        engine = make_engine(EngineSettings.model_validate(section), str(tmp_path / "work"), "hpc")
        assert isinstance(engine, PilotEngine) and engine.label == "hpc"
    assert engine.capacity == 6 and engine.name == "dask"


def test_site_status_lists_allocations(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"site: hpc\nstate_dir: {tmp_path / 'state'}\napps: {{}}\n")
    runner = CliRunner()
    assert "holds no allocations" in runner.invoke(site_app, ["status", str(site)]).stdout
    now = time.time()
    status = {
        "site": "hpc",
        "engine": "parsl",
        "updated": now,
        "pid": os.getpid(),
        "waiting_tasks": 3,
        "free_slots": 0,
        "allocations": [
            {
                "name": "rxp-1-a1",
                "state": "running",
                "job_id": "12",
                "nodes": 1,
                "node_list": "n1",
                "end_at": now + 600,
                "walltime_left_s": 700,
                "workers": 1,
                "tasks_running": 2,
                "reason": "",
            },
            {
                "name": "rxp-1-a2",
                "state": "released",
                "job_id": "13",
                "nodes": 1,
                "node_list": "n1",
                "end_at": None,
                "walltime_left_s": None,
                "workers": 0,
                "tasks_running": 0,
                "reason": "idle for 30s >= idle_timeout_s 30",
            },
        ],
    }
    (tmp_path / "state" / "pilots").mkdir(parents=True)
    (tmp_path / "state" / "pilots" / "allocations.json").write_text(json.dumps(status))
    data = json.loads(runner.invoke(site_app, ["status", str(site), "--json"]).stdout)
    assert [(a["job_id"], a["state"]) for a in data["allocations"]] == [("12", "running"), ("13", "released")]
    assert 590 < data["allocations"][0]["walltime_left_s"] <= 600  # as of now, not of the file
    assert data["agent_running"]
    table = runner.invoke(site_app, ["status", str(site)]).stdout
    assert "rxp-1-a2" in table and "idle for 30s" in table and "3 task(s) waiting" in table
