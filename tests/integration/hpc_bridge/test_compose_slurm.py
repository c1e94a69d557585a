"""SlurmDriver against a real single-node Slurm with (fake-device) GPU GRES."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reflexarc.hpc_bridge.compose import (
    Composer,
    CompositionSpec,
    DriverError,
    Identity,
    MachineState,
    PlacementError,
    SlurmDriver,
)
from reflexarc.testing.slurm import SlurmCluster

pytestmark = pytest.mark.integration

ALICE = Identity(user="alice")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One Slurm node with 8 CPUs and 4 typed GPUs (gpu:a100:4)."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=8, gres={"gpu:a100": 4}) as cluster:
        yield cluster


def pools_for(node: str) -> dict:
    """An inventory whose compute node is the Slurm node, with its 4 GPUs."""
    return {
        "racks": {
            "r1": {
                "devices": [
                    {"id": "r1-n1", "kind": "cpu", "cores": 8, "memory_gb": 16, "node": node},
                    {"id": "r1-gpu", "kind": "gpu", "model": "A100", "gres_type": "a100", "count": 4},
                    # Inventory mistakes the driver must turn into clean failures:
                    # a node Slurm does not know, and more cores than Slurm's node has.
                    {"id": "r1-ghost", "kind": "cpu", "cores": 64, "node": "no-such-node"},
                    {"id": "r1-big", "kind": "cpu", "cores": 32, "node": node},
                ]
            }
        }
    }


@pytest.fixture
def composer(tmp_path: Path, slurm: SlurmCluster) -> Iterator[Composer]:
    """A composer whose machines are Slurm allocations on ``slurm``."""
    pools = tmp_path / "pools.yaml"
    pools.write_text(yaml.safe_dump(pools_for(slurm.node_name)))
    driver = SlurmDriver(env=slurm.env, start_timeout_s=20)
    with Composer(tmp_path / "compose.db", pools, driver) as c:
        yield c


def gres_used(slurm: SlurmCluster) -> str:
    """The node's ``GresUsed=`` value (e.g. ``gpu:a100:2(IDX:0-1)``)."""
    out = slurm.run("scontrol", "-d", "show", "node", "-o", slurm.node_name).stdout
    return next(f for f in out.split() if f.startswith("GresUsed=")).removeprefix("GresUsed=")


def test_compose_two_gpus_is_a_real_allocation(slurm: SlurmCluster, composer: Composer) -> None:
    started = time.monotonic()
    spec = CompositionSpec(cpus=4, gpus=2, gpu_model="A100", memory_gb=2)
    m = composer.compose(spec, ALICE, name="gpu-box")
    job_id = m.realisation["job_id"]
    assert m.state == MachineState.COMPOSED
    assert m.realisation["gres"] == "gpu:a100:2"
    assert composer.show("gpu-box").realisation["job_id"] == job_id  # persisted

    squeue = slurm.run("squeue", "-h", "-j", job_id, "-o", "%T|%b|%N|%C").stdout.strip()
    assert squeue == f"RUNNING|gres:gpu:a100:2|{slurm.node_name}|4"
    job = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
    assert "TresPerNode=gres:gpu:a100:2" in job
    assert f"machine={m.id}" in job  # the comment links Slurm back to the composer
    assert gres_used(slurm).startswith("gpu:a100:2")

    composer.free("gpu-box", ALICE)
    assert slurm.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip() == ""
    assert gres_used(slurm).startswith("gpu:a100:0")
    assert composer.pools().used() == 0
    assert time.monotonic() - started < 30


def test_failed_realisation_gives_devices_back(composer: Composer, slurm: SlurmCluster) -> None:
    # Only the ghost node has 64 cores, and Slurm has no such node.
    with pytest.raises(DriverError, match="slurm does not know node 'no-such-node'"):
        composer.compose(CompositionSpec(cpus=64), ALICE)
    # r1-big claims 32 cores on an 8-CPU Slurm node: the job can never start.
    started = time.monotonic()
    with pytest.raises(DriverError, match=r"cannot start holder job .*PartitionConfig"):
        composer.compose(CompositionSpec(cpus=32), ALICE)
    assert time.monotonic() - started < 10  # not the 20 s start timeout
    machines = composer.list(all=True)
    assert [m.state for m in machines] == [MachineState.FAILED, MachineState.FAILED]
    assert composer.pools().used() == 0
    assert slurm.job_ids() == []
    assert [e.outcome for e in composer.audit()] == ["failed", "failed"]


def test_pool_exhaustion_before_slurm_is_asked(composer: Composer, slurm: SlurmCluster) -> None:
    m = composer.compose(CompositionSpec(cpus=2, gpus=4), ALICE)
    with pytest.raises(PlacementError, match="need 1 gpu in one fabric domain"):
        composer.compose(CompositionSpec(cpus=2, gpus=1), ALICE)
    assert len(slurm.job_ids()) == 1
    composer.free(m.id, ALICE)
    assert slurm.job_ids() == []


def test_forced_free_finds_a_holder_job_whose_id_a_crash_lost(composer: Composer, slurm: SlurmCluster) -> None:
    m = composer.compose(CompositionSpec(cpus=2, gpus=1), ALICE, name="crashy")
    # A crash between sbatch and recording the job id leaves the machine 'composing' without a realisation.
    with composer.store.write() as conn:
        composer.store.set_state(
            conn, m.id, expect=[MachineState.COMPOSED], state=MachineState.COMPOSING, realisation={}
        )
    assert slurm.job_ids() == [m.realisation["job_id"]]
    composer.free("crashy", ALICE, force=True)
    assert slurm.job_ids() == []  # found by its name rx-compose-crashy and cancelled
    assert composer.pools().used() == 0


def test_slurm_cluster_counted_gres_and_clean_stop(tmp_path: Path) -> None:
    """The fixture itself: a second cluster at once, a Count= GRES, nothing left behind."""
    cluster = SlurmCluster(tmp_path / "second", cpus=4, gres={"gpu": 1, "fpga": 3})
    with cluster:
        pids = cluster.pids
        assert len(pids) == 2
        job = cluster.run(
            "sbatch",
            "--parsable",
            "--gres=fpga:2,gpu:1",
            "--output=/dev/null",
            "--wrap",
            "sleep 300",
        ).stdout.strip()
        deadline = time.monotonic() + 60  # a loaded 2-core machine schedules slowly
        while cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, (
                cluster.run("squeue", "-h", "-j", job, "-o", "%T %r").stdout,
                cluster.run("scontrol", "show", "node", "-o").stdout,
            )
            time.sleep(0.1)
        assert "Name=fpga Count=3" in (cluster.workdir / "gres.conf").read_text()
    # stop() cancelled the running job and ended both daemons.
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid)
    assert cluster.pids == []


def _proc_state(pid: int) -> str:
    """The state letter of a process (Z for a zombie waiting for init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
