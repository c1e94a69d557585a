"""Placement: rack preference, fabric domains, fallback racks, error text."""

from __future__ import annotations

import pytest
from compose_testkit import pools_doc

from reflexarc.hpc_bridge.compose import CompositionSpec, Device, PlacementError, parse_pools, place
from reflexarc.hpc_bridge.compose.placement import satisfies


@pytest.fixture
def free() -> list[Device]:
    """Every device of the test inventory, all free."""
    return [Device.model_validate(d) for d in parse_pools(pools_doc()).devices()]


def ids(devices: list[Device]) -> list[str]:
    """Device ids, for readable assertions."""
    return [d.id for d in devices]


def test_preferred_rack_is_used_when_it_has_everything(free: list[Device]) -> None:
    got = place(CompositionSpec(cpus=8, gpus=1, gpu_model="A100", nics=1, rack="r1"), free)
    assert ids(got) == ["r1-n1", "r1-a100", "r1-nic"]


def test_falls_back_to_a_rack_that_has_all_of_it(free: list[Device]) -> None:
    # r1 has one A100; r2 has two: the whole machine moves to r2, never split.
    got = place(CompositionSpec(cpus=8, gpus=2, gpu_model="A100", rack="r1"), free)
    assert ids(got) == ["r2-n1", "r2-a100-1", "r2-a100-2"]
    assert {d.rack for d in got} == {"r2"}


def test_fabric_domain_may_span_racks(free: list[Device]) -> None:
    # r3 (compute) and r4 (GPUs) share fabric f34, so V100s join r3's node.
    got = place(CompositionSpec(cpus=16, gpus=2, gpu_model="v100"), free)
    assert ids(got) == ["r3-n1", "r4-v100-1", "r4-v100-2"]
    assert {d.fabric for d in got} == {"f34"}


def test_gpu_never_joins_a_node_in_another_fabric(free: list[Device]) -> None:
    # Remove r2's node: its A100s are free but no compute node shares their fabric.
    without_r2_node = [d for d in free if d.id != "r2-n1"]
    with pytest.raises(PlacementError) as err:
        place(CompositionSpec(cpus=8, gpus=2, gpu_model="A100"), without_r2_node)
    msg = str(err.value)
    assert "no domain has all of it" in msg
    assert "closest is rack r1" in msg


def test_not_enough_gpus_says_what_is_missing(free: list[Device]) -> None:
    with pytest.raises(PlacementError) as err:
        place(CompositionSpec(cpus=4, gpus=3, gpu_model="A100"), free)
    assert str(err.value) == (
        "need 3 gpu(model=A100) in one fabric domain; the most any domain has free is 2 (rack r2)"
    )


def test_not_enough_gpus_after_allocation(free: list[Device]) -> None:
    one_left = [d for d in free if d.id != "r2-a100-2"]
    with pytest.raises(
        PlacementError,
        match=r"need 2 gpu\(model=A100\) in one fabric domain; "
        r"the most any domain has free is 1 \(rack r1\)",
    ):
        place(CompositionSpec(cpus=4, gpus=2, gpu_model="A100"), one_left)


def test_compute_node_too_small(free: list[Device]) -> None:
    with pytest.raises(
        PlacementError,
        match="need a compute node with 128 cores in one fabric domain; the largest free is 64 cores, 512 GB",
    ):
        place(CompositionSpec(cpus=128), free)


def test_several_shortfalls_are_all_named(free: list[Device]) -> None:
    with pytest.raises(PlacementError) as err:
        place(CompositionSpec(cpus=4, storage_gb=5000, nics=3), free)
    msg = str(err.value)
    assert "need 5000 GB of nvme/storage in one fabric domain; the most any domain has free is 1000 GB" in msg
    assert "need 3 nic in one fabric domain; the most any domain has free is 2 (rack r2)" in msg


def test_nothing_free() -> None:
    with pytest.raises(PlacementError, match="no device is free"):
        place(CompositionSpec(), [])


def test_storage_best_fit(free: list[Device]) -> None:
    # 800 GB in r1 needs both 500 GB drives; 1000 GB in r2 is one drive.
    r1 = place(CompositionSpec(cpus=8, storage_gb=800, rack="r1"), free)
    assert ids(r1) == ["r1-n1", "r1-nvme-1", "r1-nvme-2"]
    r2 = place(CompositionSpec(cpus=8, storage_gb=1000, rack="r2"), free)
    assert ids(r2) == ["r2-n1", "r2-nvme"]


def test_smallest_fitting_node_is_chosen(free: list[Device]) -> None:
    # 16 cores fits r3 (16), r1 (32), r2 (64): best fit keeps the big nodes.
    assert ids(place(CompositionSpec(cpus=16), free)) == ["r3-n1"]


def test_satisfies_checks_counts_and_fabric(free: list[Device]) -> None:
    by_id = {d.id: d for d in free}
    spec = CompositionSpec(cpus=8, gpus=1, gpu_model="A100")
    assert satisfies(spec, [by_id["r1-n1"], by_id["r1-a100"]])
    assert not satisfies(spec, [by_id["r1-n1"], by_id["r2-a100-1"]])  # two fabrics
    assert not satisfies(spec, [by_id["r1-n1"], by_id["r2-h100"]])  # wrong model
    assert not satisfies(spec, [by_id["r1-n1"]])  # GPU missing
