"""Elastic composed machines: fits locally / compose / reuse / wait / free after idle / nothing fits / restart."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from reflexarc.events import Resources
from reflexarc.hpc_bridge.apps import AppSpec, Implementation, SiteResources
from reflexarc.hpc_bridge.compose import (
    Composer,
    CompositionSpec,
    Device,
    Identity,
    InventoryDriver,
    Machine,
    MachineState,
    PlacementError,
)
from reflexarc.hpc_bridge.machines import (
    MachinePool,
    Slot,
    decide,
    exceeds,
    expired,
    fits,
    machine_environment,
    offer_of,
    spec_for,
    task_needs,
)

AGENT = Identity(user="site-agent")


def machine(mid: str, cpus: int, gpus: int, model: str = "A100", memory_gb: int = 0) -> Machine:
    """A composed machine (for the pure decisions; no database)."""
    devs = [Device(id=f"{mid}-n", kind="cpu", rack="r1", fabric="r1", cores=cpus, node="node1")]
    devs += [Device(id=f"{mid}-g{i}", kind="gpu", rack="r1", fabric="r1", model=model) for i in range(gpus)]
    return Machine(
        id=mid,
        owner="site-agent",
        spec=CompositionSpec(cpus=cpus, gpus=gpus, memory_gb=memory_gb),
        devices=devs,
        state=MachineState.COMPOSED,
        driver="inventory",
        created_at=datetime.now(UTC),
    )


# ---- pure decisions ----------------------------------------------------------------------------------
def test_fits_locally_or_says_why_not() -> None:
    site = SiteResources(cpus=4, gpus=0, memory_gb=8)
    assert exceeds(Resources(cpus=2), site) is None
    assert exceeds(Resources(gpus=2), site) == "needs 2 GPU(s), the site offers 0"
    assert exceeds(Resources(cpus=16), site) == "needs 16 CPUs, the site offers 4"
    assert exceeds(Resources(memory_gb=32), site) == "needs 32 GB memory, the site offers 8"
    gpu_site = SiteResources(cpus=4, gpus=2, gpu_model="V100")
    assert exceeds(Resources(gpus=2), gpu_site) is None
    assert exceeds(Resources(gpus=1, gpu_model="A100"), gpu_site) == "needs GPU model A100, the site has V100"


def test_needs_merge_request_and_app() -> None:
    # The app declares 2 GPUs: a request without resources still needs them.
    assert task_needs(Resources(), AppSpec(function="m:f", gpus=2, gpu_model="A100")) == Resources(
        cpus=1, gpus=2, gpu_model="A100"
    )
    # A CPU implementation exists: nothing forces a GPU (the site picks the best it has).
    with_cpu = AppSpec(function="m:f", gpus=1, implementations=[Implementation(function="m:g", gpus=0)])
    assert task_needs(Resources(), with_cpu).gpus == 0
    # The request wins where it asks for more.
    need = task_needs(Resources(cpus=4, gpus=2, memory_gb=3.5), AppSpec(function="m:f", cpus=2, memory_gb=2))
    assert (need.cpus, need.gpus, need.memory_gb) == (4, 2, 3.5)
    assert spec_for(need, rack="r2") == CompositionSpec(cpus=4, gpus=2, memory_gb=4, rack="r2")


def test_decide_reuses_the_smallest_idle_machine_that_fits() -> None:
    big, small, busy = machine("big", 8, 4), machine("small", 2, 2), machine("busy", 2, 2)
    slots = [Slot(big, None, 1.0), Slot(small, None, 2.0), Slot(busy, "t0", 0.0)]
    d = decide(CompositionSpec(gpus=2), slots, reserved=0, max_machines=4)
    assert d.action == "reuse" and d.slot is slots[1]
    assert decide(CompositionSpec(gpus=3), slots, 0, 4).slot is slots[0]
    assert not fits(small, CompositionSpec(gpus=2, gpu_model="H100"))
    assert not fits(machine("m", 2, 2, memory_gb=4), CompositionSpec(memory_gb=8))


def test_decide_composes_evicts_or_waits_at_the_limit() -> None:
    busy = Slot(machine("a", 2, 2), "t1", 0.0)
    idle_small = Slot(machine("b", 2, 1), None, 5.0)
    need = CompositionSpec(gpus=2)
    assert decide(need, [busy], reserved=0, max_machines=2).action == "compose"
    # A composition under way counts against the limit.
    assert decide(need, [busy], reserved=1, max_machines=2).action == "wait"
    d = decide(need, [busy, idle_small], reserved=0, max_machines=2)
    assert d.action == "evict" and d.slot is idle_small
    assert decide(need, [busy, Slot(machine("c", 2, 2), "t2", 0.0)], 0, 2).action == "wait"


def test_only_idle_machines_expire() -> None:
    slots = [
        Slot(machine("idle", 1, 1), None, 10.0),
        Slot(machine("busy", 1, 1), "t", 0.0),
        Slot(machine("fresh", 1, 1), None, 19.0),
    ]
    assert [s.machine.id for s in expired(slots, now=20.0, idle_timeout_s=5.0)] == ["idle"]
    assert expired(slots, now=1000.0, idle_timeout_s=5.0)[1:] == [slots[2]]


def test_machine_environment_and_offer() -> None:
    m = machine("m-1", 4, 2)
    env = machine_environment(m, set_cuda=True)
    assert env["RX_MACHINE"] == "m-1" and env["RX_MACHINE_GPUS"] == "m-1-g0,m-1-g1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["RX_MACHINE_NODE"] == "node1"
    assert "CUDA_VISIBLE_DEVICES" not in machine_environment(m, set_cuda=False)  # Slurm sets it itself
    labelled = m.model_copy(
        update={"devices": [m.devices[0], m.devices[1].model_copy(update={"labels": {"index": "6"}})]}
    )
    assert machine_environment(labelled, set_cuda=True)["CUDA_VISIBLE_DEVICES"] == "6"
    assert offer_of(m) == SiteResources(cpus=4, gpus=2, gpu_model="A100")


# ---- the pool on a real composer (inventory driver, SQLite) ----------------------------------------------
class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pools_file(tmp_path: Path, gpus: int = 4) -> Path:
    """One rack: four compute nodes and ``gpus`` A100s."""
    p = tmp_path / "pools.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "racks": {
                    "r1": {
                        "devices": [
                            {"id": "n", "kind": "cpu", "cores": 8, "count": 4},
                            {"id": "gpu", "kind": "gpu", "model": "A100", "count": gpus},
                        ]
                    }
                }
            }
        )
    )
    return p


@pytest.fixture
def composer(tmp_path: Path) -> Composer:
    """A composer on a temporary database."""
    c = Composer(tmp_path / "compose.db", pools_file(tmp_path))
    yield c
    c.close()


def pool(composer: Composer, clock: Clock, **kw: object) -> MachinePool:
    """A pool for site 'hpc' with a short idle timeout."""
    opts = {"idle_timeout_s": 30.0, "max_machines": 2, **kw}
    return MachinePool(composer, AGENT, "hpc", clock=clock, **opts)  # type: ignore[arg-type]


async def test_compose_reuse_and_free_after_idle(composer: Composer) -> None:
    clock = Clock()
    p = pool(composer, clock)
    notes: list[str] = []

    async def note(text: str) -> None:
        notes.append(text)

    m1 = await p.acquire("t1", Resources(gpus=2), note)
    assert m1.state is MachineState.COMPOSED and len(m1.device_ids) == 3 and m1.name.startswith(p.prefix)
    assert notes == ["composing a machine (1 cores, 2 gpu)"]
    await p.release("t1")
    m2 = await p.acquire("t2", Resources(gpus=1))  # an idle machine that fits is reused
    assert m2.id == m1.id and composer.pools().used("gpu") == 2
    clock.now += 1000
    assert await p.reap() == []  # busy: never freed, however long
    await p.release("t2")
    clock.now += 29
    assert await p.reap() == []
    clock.now += 1
    assert await p.reap() == [m1.id]
    assert composer.pools().used() == 0 and composer.show(m1.id).state is MachineState.FREED
    assert [(e.action, e.outcome, e.user) for e in composer.audit()] == [
        ("compose", "ok", "site-agent"),
        ("free", "ok", "site-agent"),
    ]


async def test_nothing_fits_raises_the_composers_reason(composer: Composer) -> None:
    p = pool(composer, Clock())
    with pytest.raises(PlacementError, match=r"need 8 gpu.*the most any domain has free is 4"):
        await p.acquire("t", Resources(gpus=8))
    assert p.slots() == [] and composer.pools().used() == 0
    # The pool is not wedged by the failure.
    assert (await p.acquire("t2", Resources(gpus=4))).spec.gpus == 4


async def test_waits_at_max_machines_until_one_is_released(composer: Composer) -> None:
    p = pool(composer, Clock(), max_machines=1)
    await p.acquire("t1", Resources(gpus=1))
    notes: list[str] = []

    async def note(text: str) -> None:
        notes.append(text)

    waiter = asyncio.create_task(p.acquire("t2", Resources(gpus=1), note))
    for _ in range(100):
        if notes:
            break
        await asyncio.sleep(0.01)
    assert not waiter.done() and "max_machines" in notes[0]
    await p.release("t1")
    m = await asyncio.wait_for(waiter, 5)
    assert p.machine_of("t2") == m and len(p.slots()) == 1


async def test_idle_machines_make_room_when_the_pools_are_short(composer: Composer) -> None:
    p = pool(composer, Clock(), max_machines=4)
    small = await p.acquire("t1", Resources(gpus=2))
    await p.release("t1")
    # 4 GPUs exist, 2 are held by an idle machine of ours: it is freed for the bigger task.
    big = await p.acquire("t2", Resources(gpus=4))
    assert big.spec.gpus == 4 and composer.show(small.id).state is MachineState.FREED
    # A busy machine is never taken away: then the composer's reason stands.
    with pytest.raises(PlacementError):
        await p.acquire("t3", Resources(gpus=1))
    await p.release("t2")
    # An idle machine is not given up for a task that would not fit anyway.
    with pytest.raises(PlacementError, match="need 5 gpu"):
        await p.acquire("t4", Resources(gpus=5))
    assert composer.show(big.id).state is MachineState.COMPOSED and p.slots()[0].machine.id == big.id


async def test_restart_adopts_machines_and_frees_half_made_ones(tmp_path: Path, composer: Composer) -> None:
    clock = Clock()
    first = pool(composer, clock)
    kept = await first.acquire("t1", Resources(gpus=2))
    # Someone else's machine and a machine a crash left 'composing' (devices held, no driver result).
    other = composer.compose({"gpus": 1}, Identity(user="alice"))
    stuck = composer.compose({"gpus": 1}, AGENT, name=f"{first.prefix}stuck")
    with composer.store.write() as conn:
        composer.store.set_state(conn, stuck.id, expect=[MachineState.COMPOSED], state=MachineState.COMPOSING)
    # A new agent process: a fresh composer on the same database.
    again = Composer(tmp_path / "compose.db", tmp_path / "pools.yaml")
    try:
        second = pool(again, clock)
        adopted = await second.adopt()
        assert [m.id for m in adopted] == [kept.id]
        assert again.show(stuck.id).state is MachineState.FREED
        assert again.show(other.id).state is MachineState.COMPOSED  # not ours: left alone
        assert (await second.acquire("t2", Resources(gpus=1))).id == kept.id  # reused
        await second.release("t2")
        clock.now += 31
        assert await second.reap() == [kept.id]
        assert again.pools().used("gpu") == 1  # only alice's machine
    finally:
        again.close()


async def test_clean_stop_frees_idle_machines_only(composer: Composer) -> None:
    p = pool(composer, Clock())
    idle = await p.acquire("t1", Resources(gpus=1))
    await p.release("t1")
    busy = await p.acquire("t2", Resources(gpus=2))
    await p.close(free_idle=True)
    assert composer.show(idle.id).state is MachineState.FREED
    assert composer.show(busy.id).state is MachineState.COMPOSED


async def test_at_the_limit_an_impossible_task_fails_at_once_and_frees_nothing(composer: Composer) -> None:
    p = pool(composer, Clock(), max_machines=2)
    busy = await p.acquire("t1", Resources(gpus=1))
    idle = await p.acquire("t2", Resources(gpus=1))
    await p.release("t2")
    # 8 GPUs fit nowhere even if this site freed everything: no waiting, no eviction.
    with pytest.raises(
        PlacementError,
        match=r"need 8 gpu .* is 2 \(rack r1\); even if this site freed its 2 machine\(s\): "
        r"need 8 gpu in one fabric domain; the most any domain has free is 4 \(rack r1\)",
    ):
        await asyncio.wait_for(p.acquire("t3", Resources(gpus=8)), 5)
    assert {m.id: composer.show(m.id).state for m in (busy, idle)} == {
        busy.id: MachineState.COMPOSED,
        idle.id: MachineState.COMPOSED,
    }
    # 3 GPUs fit once the idle machine is freed: it makes room (max_machines stays 2).
    three = await asyncio.wait_for(p.acquire("t4", Resources(gpus=3)), 5)
    assert three.spec.gpus == 3 and composer.show(idle.id).state is MachineState.FREED
    assert len(p.slots()) == 2


class SlowDriver(InventoryDriver):
    """Realising takes a while (as a Slurm holder job does): devices are allocated, the machine not yet ready."""

    def realise(self, machine: Machine) -> dict:
        time.sleep(0.3)
        return super().realise(machine)


async def test_concurrent_tasks_share_the_limit_and_all_run(tmp_path: Path) -> None:
    """Three 2-GPU tasks at once, 4 GPUs, max_machines 2: two compositions, the third task waits and reuses."""
    composer = Composer(tmp_path / "slow.db", pools_file(tmp_path), SlowDriver())
    p = pool(composer, Clock(), max_machines=2)

    async def task(tid: str) -> str:
        m = await p.acquire(tid, Resources(gpus=2))
        await asyncio.sleep(0.05)
        await p.release(tid)
        return m.id

    ids = await asyncio.wait_for(asyncio.gather(*(task(f"t{i}") for i in range(3))), 10)
    assert len(set(ids)) == 2 and sorted(ids.count(i) for i in set(ids)) == [1, 2]
    assert [e.outcome for e in composer.audit()] == ["ok", "ok"]
    composer.close()
