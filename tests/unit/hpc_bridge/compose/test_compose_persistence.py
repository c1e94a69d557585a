"""Restart persistence, export -> apply reproducibility, rich views, the async API."""

from __future__ import annotations

from pathlib import Path

import pytest
from compose_testkit import write_pools
from rich.console import Console

from reflexarc.hpc_bridge.compose import (
    Composer,
    CompositionSpec,
    Identity,
    MachineState,
    load_compositions,
)
from reflexarc.hpc_bridge.compose.placement import satisfies

ALICE = Identity(user="alice")


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    """(database file, pools file)."""
    return tmp_path / "compose.db", write_pools(tmp_path / "pools.yaml")


def test_new_composer_sees_the_same_machines(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    with Composer(db, pools) as first:
        m = first.compose(CompositionSpec(cpus=8, gpus=2, gpu_model="A100"), ALICE, name="train")
        before = first.pools()
    with Composer(f"sqlite:///{db}") as second:  # URL form, no pools file: read-only use
        again = second.show("train")
        assert again.model_dump() == second.show(m.id).model_dump()
        assert again.id == m.id and again.device_ids == m.device_ids
        assert again.state == MachineState.COMPOSED
        assert again.created_at == m.created_at
        assert [x.id for x in second.list()] == [m.id]
        assert second.pools() == before
        second.free("train", ALICE)
    with Composer(db, pools) as third:
        assert third.list() == []
        assert [x.state for x in third.list(all=True)] == [MachineState.FREED]
        assert third.pools().used() == 0


def test_export_then_apply_recomposes_same_devices(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    with Composer(db, pools) as c:
        spec = CompositionSpec(cpus=8, gpus=1, gpu_model="A100", storage_gb=800, rack="r1")
        m = c.compose(spec, ALICE, name="exp")
        text = c.export("exp")
        assert "r1-nvme-2" in text
        c.free(m.id, ALICE)
    with Composer(db, pools) as c:
        [result] = c.apply(text, ALICE)
        assert result.action == "created"
        again = c.show("exp")
        assert again.id != m.id
        assert again.device_ids == m.device_ids
        assert again.spec == m.spec
        # Idempotent: a second apply changes nothing.
        [result] = c.apply(text, ALICE)
        assert (result.action, result.machine_id) == ("unchanged", again.id)


def test_apply_places_equivalent_machine_when_devices_are_taken(paths: tuple[Path, Path], tmp_path: Path) -> None:
    db, pools = paths
    with Composer(db, pools) as c:
        m = c.compose(CompositionSpec(cpus=16, gpus=1, gpu_model="A100"), ALICE, name="a")
        exported = tmp_path / "a.yaml"
        exported.write_text(c.export("a"))
        c.free("a", ALICE)
        blocker = c.compose(CompositionSpec(cpus=16), ALICE, devices=[m.device_ids[0]])
        assert blocker.device_ids == [m.device_ids[0]]
        [result] = c.apply(exported, ALICE)  # a Path this time
        again = c.show(result.machine_id)
        assert again.device_ids != m.device_ids
        assert satisfies(again.spec, again.devices)


def test_apply_replaces_changed_spec_and_prunes(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    with Composer(db, pools) as c:
        c.apply("machines:\n- {name: a, spec: {cpus: 8}}\n- {name: b, spec: {cpus: 8}}\n", ALICE)
        old_a = c.show("a")
        results = c.apply("machines:\n- {name: a, spec: {cpus: 8, gpus: 1}}\n", ALICE, prune=True)
        assert [(r.name, r.action) for r in results] == [("a", "replaced"), ("b", "pruned")]
        assert c.show(old_a.id).state == MachineState.FREED
        assert [m.name for m in c.list()] == ["a"]
        assert c.show("a").spec.gpus == 1


def test_compositions_file_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"<text>: machines\.0\.spec\.gpus: Input should be"):
        load_compositions("machines:\n- {name: x, spec: {gpus: lots}}\n")
    bad = tmp_path / "c.yaml"
    bad.write_text("machines:\n- {name: x, spec: {}}\n- {name: x, spec: {}}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: .*appears twice"):
        load_compositions(str(bad))


def test_names_are_unique_among_live_machines(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    with Composer(db, pools) as c:
        c.compose(CompositionSpec(), ALICE, name="one")
        with pytest.raises(ValueError, match="a machine named 'one' already exists"):
            c.compose(CompositionSpec(), ALICE, name="one")
        c.free("one", ALICE)
        c.compose(CompositionSpec(), ALICE, name="one")  # free names can be reused


def test_rich_views_render(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    console = Console(width=160, record=True)
    with Composer(db, pools) as c:
        m = c.compose(CompositionSpec(cpus=8, gpus=1, gpu_model="H100"), ALICE, name="viz")
        console.print(m)
        console.print(c.pools())
    text = console.export_text()
    assert "r2-h100" in text and "gpu H100" in text
    assert "pools" in text and "0/64 cores" in text


async def test_async_wrappers_do_not_block(paths: tuple[Path, Path]) -> None:
    db, pools = paths
    with Composer(db, pools) as c:
        m = await c.acompose({"cpus": 4}, ALICE)
        assert (await c.afree(m.id, ALICE)).state == MachineState.FREED
