"""Shared helpers for the compose tests (not a test module: no ``test_`` prefix).

Also runnable as a script, so the concurrency test can churn from separate
processes: ``python compose_testkit.py DB POOLS USER OPS SEED``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from reflexarc.hpc_bridge.compose import (
    Composer,
    CompositionSpec,
    Identity,
    PlacementError,
    hash_token,
)

ALICE_TOKEN = "alice-secret-token"
BOB_TOKEN = "bob-secret-token"
ADMIN_TOKEN = "ops-secret-token"


def pools_doc() -> dict:
    """Four racks: r1 and r2 are their own domains, r3+r4 share fabric f34."""
    return {
        "racks": {
            "r1": {
                "devices": [
                    {"id": "r1-n1", "kind": "cpu", "cores": 32, "memory_gb": 256},
                    {"id": "r1-a100", "kind": "gpu", "model": "A100"},
                    {"id": "r1-nvme", "kind": "nvme", "capacity_gb": 500, "count": 2},
                    {"id": "r1-nic", "kind": "nic", "speed_gbps": 100},
                ]
            },
            "r2": {
                "devices": [
                    {"id": "r2-n1", "kind": "cpu", "cores": 64, "memory_gb": 512},
                    {"id": "r2-a100", "kind": "gpu", "model": "A100", "count": 2},
                    {"id": "r2-h100", "kind": "gpu", "model": "H100"},
                    {"id": "r2-nvme", "kind": "nvme", "capacity_gb": 1000},
                    {"id": "r2-nic", "kind": "nic", "count": 2},
                ]
            },
            "r3": {"fabric": "f34", "devices": [{"id": "r3-n1", "kind": "cpu", "cores": 16}]},
            "r4": {
                "fabric": "f34",
                "devices": [{"id": "r4-v100", "kind": "gpu", "model": "V100", "count": 2}],
            },
        },
        "tokens": [
            {"user": "alice", "sha256": hash_token(ALICE_TOKEN)},
            {"user": "bob", "sha256": hash_token(BOB_TOKEN)},
            {"user": "ops", "sha256": hash_token(ADMIN_TOKEN), "admin": True},
        ],
    }


def churn_pools_doc(racks: int = 4) -> dict:
    """A bigger, uniform inventory for the concurrency test."""
    doc: dict = {"racks": {}, "tokens": []}
    for r in range(1, racks + 1):
        doc["racks"][f"r{r}"] = {
            "devices": [
                {"id": f"r{r}-n", "kind": "cpu", "cores": 16, "count": 3},
                {"id": f"r{r}-gpu", "kind": "gpu", "model": "A100", "count": 4},
                {"id": f"r{r}-nvme", "kind": "nvme", "capacity_gb": 500, "count": 3},
                {"id": f"r{r}-nic", "kind": "nic", "count": 2},
            ]
        }
    return doc


def write_pools(path: Path, doc: dict | None = None) -> Path:
    """Write a pools YAML file and return its path."""
    path.write_text(yaml.safe_dump(doc if doc is not None else pools_doc()))
    return path


@dataclass
class ChurnStats:
    """What one churn worker did."""

    composed: int = 0
    freed: int = 0
    no_room: int = 0
    held: int = 0


def churn(composer: Composer, identity: Identity, ops: int, seed: int, free_all: bool = True) -> ChurnStats:
    """Compose random machines and free some of them at random, ``ops`` times."""
    rng = random.Random(seed)
    held: list[str] = []
    stats = ChurnStats()
    for _ in range(ops):
        spec = CompositionSpec(
            cpus=rng.choice([1, 8, 16]),
            gpus=rng.choice([0, 1, 2]),
            storage_gb=rng.choice([0, 500, 1000]),
            nics=rng.choice([0, 1]),
            rack=rng.choice([None, "r1", "r2"]),
        )
        try:
            held.append(composer.compose(spec, identity).id)
            stats.composed += 1
        except PlacementError:
            stats.no_room += 1
        if held and rng.random() < 0.6:
            composer.free(held.pop(rng.randrange(len(held))), identity)
            stats.freed += 1
    if free_all:
        for machine_id in held:
            composer.free(machine_id, identity)
            stats.freed += 1
        held.clear()
    stats.held = len(held)
    return stats


if __name__ == "__main__":
    db, pools, user, ops, seed = sys.argv[1:6]
    with Composer(db, pools) as c:
        # Tell the parent we are up, then start together with its threads.
        print("ready", flush=True)
        sys.stdin.readline()
        result = churn(c, Identity(user=user), int(ops), int(seed), free_all=False)
    print(json.dumps(asdict(result)))
